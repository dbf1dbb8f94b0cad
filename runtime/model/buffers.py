"""Row moves inside the preallocated key/value buffers of the static layouts (beam reordering, dropping rows)."""

from __future__ import annotations

import numpy as np


def move_rows(buffer: np.ndarray, targets: np.ndarray, sources: np.ndarray, used: int) -> None:
    """buffer[:, :, targets, :, :used] = buffer[:, :, sources, :, :used] for a (layers, 2, rows, heads, positions,
    head_size) buffer, in place.

    One (layer, key/value) plane at a time: the gathered temporary stays one plane big, which is 2x faster than
    a single gather over all layers at 32 rows. Each right side is a copy, so sources that the assignment
    overwrites are read before they are.
    """
    for plane in buffer.reshape(-1, *buffer.shape[2:]):  # a view: the buffer is C-contiguous
        plane[targets, :, :used] = plane[sources, :, :used]
