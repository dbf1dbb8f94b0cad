"""The one exception the exporter raises for anything the user can fix."""

from __future__ import annotations


class ExportError(Exception):
    """An export that cannot go ahead or did not verify; ``str(err)`` is one line meant for the user.

    The command line prints the message and exits with status 2.
    """
