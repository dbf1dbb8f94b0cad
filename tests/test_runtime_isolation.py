"""The runtime never imports torch, transformers or optimum: not at import, not during a full generation.

CI also runs the runtime tests in a venv where torch and transformers are not installed at all; this file adds
the check that holds in any environment: a subprocess where importing them fails loudly.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import onnxgen

FORBIDDEN = ("torch", "transformers", "optimum")
RUNTIME_DIR = Path(onnxgen.__file__).parent

_PROBE = r"""
import importlib.abc, json, sys
FORBIDDEN = {forbidden!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"the runtime imported {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
import onnxgen
after_import = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
from onnxgen import TextGeneration
tg = TextGeneration({model_dir!r}, device="cpu")
texts = [tg("The cat", do_sample=False, max_new_tokens=5), tg(["a", "bb"], num_beams=2, max_new_tokens=4),
         tg("The cat", max_new_tokens=4, seed=1), "".join(tg.stream("The cat", max_new_tokens=4, seed=1))]
print(json.dumps({{"after_import": after_import, "texts": texts,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)}}))
"""


def _probe(model_dir: Path) -> dict:
    code = _PROBE.format(forbidden=FORBIDDEN, model_dir=str(model_dir))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_and_generation_never_touch_torch(tiny_gpt2_onnx, tiny_t5_onnx):
    for model_dir in (tiny_gpt2_onnx, tiny_t5_onnx):
        report = _probe(model_dir)
        assert report["after_import"] == [] and report["loaded"] == []
        assert all(isinstance(t, (str, list)) for t in report["texts"])


def test_no_runtime_module_imports_torch():
    offenders = []
    for path in RUNTIME_DIR.rglob("*.py"):
        if "export" in path.relative_to(RUNTIME_DIR).parts:
            continue  # onnxgen.export is the one place allowed to
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_the_runtime_only_environment_really_lacks_torch():
    """CI sets ONNXGEN_RUNTIME_ONLY=1 in its torch-free venv: there the absence must be real, not simulated."""
    import importlib.util
    import os

    import pytest

    if os.environ.get("ONNXGEN_RUNTIME_ONLY") != "1":
        pytest.skip("only meaningful in CI's runtime-only venv")
    assert [name for name in FORBIDDEN if importlib.util.find_spec(name) is not None] == []
