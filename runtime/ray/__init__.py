"""Scale out on Ray (needs the `ray` extra: `pip install 'onnxgen[ray]'`).

* `onnxgen.ray.data`: `TextGenerationUDF`, a stateful actor UDF for `Dataset.map_batches`, and
  `map_text_generation`, which wires it up; `onnxgen batch --ray` runs on it.
* `onnxgen.ray.serve`: `serve_ray`, the HTTP API of `onnxgen serve` as a replicated Ray Serve deployment.

Nothing here imports Ray until it is used, and the rest of onnxgen never imports this package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TextGenerationUDF", "app_builder", "build_app", "map_text_generation", "serve_ray"]

_LAZY = {
    "TextGenerationUDF": "onnxgen.ray.data",
    "map_text_generation": "onnxgen.ray.data",
    "serve_ray": "onnxgen.ray.serve",
    "build_app": "onnxgen.ray.serve",
    "app_builder": "onnxgen.ray.serve",
}


def require_ray():
    """The `ray` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("this needs Ray: pip install 'onnxgen[ray]' (ray[data,serve] and pyarrow)") from None
    return ray


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxgen.ray' has no attribute {name!r}")
