"""The API edge: Backprop's keyword arguments in, a validated `GenerationConfig` out.

`None` counts as not given (Backprop's callers pass `top_k=None`); unknown names are errors with a suggestion,
never silently ignored.
"""

from __future__ import annotations

import difflib
from typing import Any

from .config import GenerationConfig

# Backprop's name -> transformers' name, where they differ.
BACKPROP_ALIASES = {"num_generations": "num_return_sequences"}
ACCEPTED_NAMES = tuple(sorted(set(GenerationConfig.field_names()) | set(BACKPROP_ALIASES)))


def config_from_kwargs(params: dict[str, Any]) -> GenerationConfig:
    values: dict[str, Any] = {}
    for name, value in params.items():
        if name not in ACCEPTED_NAMES:
            close = difflib.get_close_matches(name, ACCEPTED_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"unknown generation parameter {name!r}{hint}; accepted: {', '.join(ACCEPTED_NAMES)}"
            )
        if value is None:
            continue
        target = BACKPROP_ALIASES.get(name, name)
        if target in values:
            raise TypeError(f"{name!r} and {target!r} mean the same thing; pass only one of them")
        values[target] = value
    return GenerationConfig(**values)
