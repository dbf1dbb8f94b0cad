"""``export_model``: checkpoint in, self-contained onnxgen model directory out.

The steps, each logged with its duration: load the checkpoint, export the graphs with optimum, write the
tokenizer, move large weights to external data, verify against PyTorch, write the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from onnxgen.export import onnx_files
from onnxgen.export.checkpoint import Checkpoint, load_architecture, load_checkpoint
from onnxgen.export.errors import ExportError
from onnxgen.export.tokenizer import write_tokenizer
from onnxgen.export.builders import gpt2 as gpt2_builder
from onnxgen.export.builders.verify import check_static_gpt2_agreement, verify_static_gpt2
from onnxgen.export.verify import verify_export
from onnxgen.manifest import FORMAT_VERSION, MANIFEST_FILE, TOKEN_LOOKUP, GraphSpec, Manifest, SpecialTokens

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-3  # float32 logits of the real GPT-2/T5 sizes agree to ~1e-4
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf cannot serialise more than 2 GiB in one file anyway
# The fused graphs keep every weight in a data file by default: onnxruntime then maps it instead of parsing it out
# of the protobuf, which loads GPT-2 small twice as fast and with ~40-100 MB less peak memory.
FUSED_EXTERNAL_DATA_THRESHOLD = 0

# optimum's file for each graph the runtime loads.
GRAPH_FILES = {
    "gpt2": {"decoder": "model.onnx"},
    "t5": {
        "encoder": "encoder_model.onnx",
        "decoder": "decoder_model.onnx",
        "decoder_with_past": "decoder_with_past_model.onnx",
    },
}
# optimum also merges T5's two decoders into one graph with an If node; the runtime uses the separate pair.
UNUSED_GRAPHS = ("decoder_model_merged.onnx",)
OPTIMIZE_CHOICES = ("none", "fused")
PRECISIONS = gpt2_builder.PRECISIONS  # fp32, fp16, int8
DEFAULT_MIN_AGREEMENT = 0.99  # top-1 agreement with float32 that an fp16/int8 graph must reach
PRODUCER_PACKAGES = ("onnxgen", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


def export_model(
    source: str | Path,
    output_dir: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    external_data_threshold: int | None = None,
    progress: bool = True,
    optimize: str = "none",
    precision: str = "fp32",
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> Manifest:
    """Export a GPT-2 or T5 checkpoint (Hub id or local folder) into ``output_dir`` and return its manifest.

    force: replace the contents of a non-empty ``output_dir``.
    verify, atol: compare ONNX Runtime with PyTorch on a sample prompt; raise past ``atol`` (max abs logit diff).
    external_data_threshold: bytes of weights above which a graph keeps them in ``<graph>.onnx.data``; None:
        always for the fused graphs, above 2 GiB for optimum's.
    progress: log each step at INFO (otherwise DEBUG).
    optimize: "none" — optimum's portable graphs (CPU and CUDA); "fused" — graphs built from the weights with
        onnxruntime's fused operators, last-position logits and a static key/value buffer (CPU).
    precision: "fp32"; "fp16" or "int8" (with optimize="fused"): weights stored at that precision (int8:
        dynamically quantized MatMuls, LM head included). Instead of the float32 tolerance, such a graph must
        predict PyTorch's most likely next token at ``min_agreement`` of the positions of a fixed text.
    """
    if optimize not in OPTIMIZE_CHOICES:
        raise ExportError(f"optimize must be one of {', '.join(OPTIMIZE_CHOICES)}, got {optimize!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and optimize != "fused":
        raise ExportError(f"precision={precision!r} needs optimize='fused' (optimum's graphs are exported in fp32)")
    if not (isinstance(min_agreement, (int, float)) and 0 <= min_agreement <= 1):
        raise ExportError(f"min_agreement must be a number in [0, 1], got {min_agreement!r}")
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ExportError(f"atol must be a finite number >= 0, got {atol!r}")
    if external_data_threshold is None:
        fused = optimize == "fused"
        external_data_threshold = FUSED_EXTERNAL_DATA_THRESHOLD if fused else DEFAULT_EXTERNAL_DATA_THRESHOLD
    if not (isinstance(external_data_threshold, int) and external_data_threshold >= 0):
        raise ExportError(f"external_data_threshold must be an int >= 0 (bytes), got {external_data_threshold!r}")
    source = str(source)
    output = Path(output_dir).expanduser()
    level = logging.INFO if progress else logging.DEBUG
    _check_output_dir(output, source, force)

    with _step("loading checkpoint", level):
        architecture = load_architecture(source)
        checkpoint = load_checkpoint(source, architecture)
    builder = _fused_builder(architecture, precision) if optimize == "fused" else None
    _empty_output_dir(output)
    with _step(f"building fused {precision} graphs" if builder else "exporting with optimum", level):
        if builder:
            graphs = builder.write(checkpoint.model, output, external_data_threshold, precision)
        else:
            _export_graphs(checkpoint, output)
        tokenizer_spec = write_tokenizer(checkpoint.tokenizer, output)
        _ensure_generation_config(checkpoint.model, output)
    if not builder:
        graphs = _describe_graphs(output, architecture, external_data_threshold)
    if not verify:
        verification = {"skipped": True}
    elif precision != "fp32":
        with _step("checking top-1 agreement with PyTorch", level):
            verification = builder.check_agreement(
                checkpoint.model, checkpoint.tokenizer, output, graphs, float(min_agreement)
            )
        log.log(
            level, "top-1 agreement %.4f over %d positions (min %.4f)",
            verification["agreement"], verification["positions"], min_agreement,
        )
    else:
        check = builder.verify if builder else verify_export
        with _step("verifying against PyTorch", level):
            verification = check(checkpoint.model, checkpoint.tokenizer, output, graphs, float(atol))
        log.log(level, "max abs difference %.3g (atol %.3g)", verification["max_abs_diff"], atol)
    with _step("writing manifest", level):
        optimizations = builder.optimizations if builder else ()
        manifest = _build_manifest(
            checkpoint, output, graphs, tokenizer_spec, verification, optimizations, dtype=WEIGHT_DTYPES[precision]
        )
        manifest.save(output)
    if verification.get("passed") is False:
        kept = (
            f"the files are kept in {str(output)!r} for inspection ({MANIFEST_FILE} records passed=false)"
        )
        if "agreement" in verification:
            raise ExportError(
                f"verification failed: the {precision} graph predicts PyTorch's most likely next token at "
                f"{verification['agreement']:.2%} of {verification['positions']} positions, less than "
                f"min_agreement={min_agreement:g}; {kept}; lower --min-agreement or pass --no-verify to accept them"
            )
        raise ExportError(
            f"verification failed: ONNX logits differ from PyTorch by up to {verification['max_abs_diff']:.3g}, "
            f"more than atol={atol:g}; {kept}; raise --atol or pass --no-verify to accept them"
        )
    return manifest


WEIGHT_DTYPES = gpt2_builder.WEIGHT_DTYPES


@dataclasses.dataclass(frozen=True)
class _FusedBuilder:
    """How one architecture's graphs are built from the weights and checked."""

    write: Callable[[Any, Path, int, str], dict[str, GraphSpec]]  # (model, output, threshold, precision)
    verify: Callable[..., dict]  # float32: logits within atol of PyTorch
    check_agreement: Callable[..., dict] | None  # fp16/int8: top-1 agreement with PyTorch
    optimizations: tuple[str, ...]
    precisions: tuple[str, ...]


def _fused_builder(architecture: str, precision: str) -> _FusedBuilder:
    if architecture == "gpt2":
        def write(model: Any, output: Path, threshold: int, precision: str) -> dict[str, GraphSpec]:
            spec = gpt2_builder.write_gpt2(model, output, external_data_threshold=threshold, precision=precision)
            return {"decoder": spec}

        builder = _FusedBuilder(
            write, verify_static_gpt2, check_static_gpt2_agreement, gpt2_builder.OPTIMIZATIONS, PRECISIONS
        )
    elif architecture == "t5":
        from onnxgen.export.builders import t5 as t5_builder
        from onnxgen.export.builders.verify_t5 import check_static_t5_agreement, verify_static_t5

        def write(model: Any, output: Path, threshold: int, precision: str) -> dict[str, GraphSpec]:
            return t5_builder.write_t5(model, output, external_data_threshold=threshold, precision=precision)

        builder = _FusedBuilder(
            write, verify_static_t5, check_static_t5_agreement, t5_builder.OPTIMIZATIONS, t5_builder.PRECISIONS
        )
    else:
        raise ExportError(f"optimize='fused' is not available for {architecture}; use optimize='none'")
    if precision not in builder.precisions:
        raise ExportError(
            f"precision={precision!r} is not available for {architecture}'s fused graphs; "
            f"available: {', '.join(builder.precisions)}"
        )
    return builder


@contextlib.contextmanager
def _step(name: str, level: int) -> Iterator[None]:
    log.log(level, "%s ...", name)
    start = time.perf_counter()
    yield
    log.log(level, "%s: done in %.1f s", name, time.perf_counter() - start)


def _check_output_dir(output: Path, source: str, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"output_dir {str(output)!r} is a file, not a folder")
    source_path = Path(source).expanduser().resolve()
    if source_path.is_dir() and (output.resolve() == source_path or output.resolve() in source_path.parents):
        raise ExportError(f"output_dir {str(output)!r} would overwrite the source checkpoint folder {source!r}")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(
            f"output_dir {str(output)!r} exists and is not empty; pass --force (force=True) to replace its contents"
        )


def _empty_output_dir(output: Path) -> None:
    # Only reached after _check_output_dir and a successful checkpoint load, so a failed load destroys nothing.
    if output.is_dir():
        for child in output.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _export_graphs(checkpoint: Checkpoint, output: Path) -> None:
    # onnx_export_from_model is what optimum's main_export calls after loading; calling it with the model we
    # already hold avoids loading (say) gpt2-xl's 6 GB twice, and we verify against this same model afterwards.
    from optimum.exporters.onnx import onnx_export_from_model

    model = checkpoint.model
    # optimum's patcher sets use_cache on every sub-config (T5's encoder too) and leaves it so; verification
    # runs the model afterwards, so put the flags back.
    use_cache = {m: m.config.use_cache for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")}
    model.config.use_cache = True  # as main_export does for "-with-past" tasks
    with warnings.catch_warnings(), _quiet_optimum():
        # torch.jit tracing warns about every Python branch on tensor shapes in the modelling code.
        warnings.filterwarnings("ignore", module=r"(torch|transformers|optimum)(\.|$)")
        try:
            onnx_export_from_model(model, output, task=checkpoint.task, do_validation=False)
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"optimum could not export {checkpoint.source!r}: {str(exc).splitlines()[0]}") from exc
        finally:
            for module, value in use_cache.items():
                module.config.use_cache = value
    kept = set()
    for file in GRAPH_FILES[checkpoint.architecture].values():
        path = output / file
        if not path.exists():
            raise ExportError(f"optimum did not write {file!r} for {checkpoint.source!r}")
        kept |= onnx_files.data_files_of(path)
    for file in UNUSED_GRAPHS:
        onnx_files.remove_graph(output / file, keep=kept)


@contextlib.contextmanager
def _quiet_optimum() -> Iterator[None]:
    """Hide optimum's own warnings (tied-weight bookkeeping) unless our logger is at DEBUG."""
    optimum_logger = logging.getLogger("optimum")  # optimum installs its own handler on this one
    saved = optimum_logger.level
    if not log.isEnabledFor(logging.DEBUG):
        optimum_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        optimum_logger.setLevel(saved)


def _ensure_generation_config(model: Any, output: Path) -> None:
    """The checkpoint's generation config (the fused builders write none; optimum writes it when it is valid)."""
    if (output / "generation_config.json").exists():
        return
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    if own is not None:
        try:
            own.save_pretrained(output)
            return
        except ValueError as exc:  # transformers refuses to save a config it considers invalid
            log.warning("the checkpoint's generation config is invalid (%s); using its model config's", exc)
    GenerationConfig.from_model_config(model.config).save_pretrained(output)


def _describe_graphs(output: Path, architecture: str, threshold: int) -> dict[str, GraphSpec]:
    graphs = {}
    for name, file in GRAPH_FILES[architecture].items():
        onnx_files.externalize_if_large(output / file, threshold)
        inputs, outputs = onnx_files.graph_io_names(output / file)
        graphs[name] = GraphSpec(file=file, inputs=tuple(inputs), outputs=tuple(outputs))
    return graphs


def _build_manifest(
    checkpoint: Checkpoint,
    output: Path,
    graphs: dict[str, GraphSpec],
    tokenizer_spec: Any,
    verification: dict,
    optimizations: tuple[str, ...] = (),
    dtype: str = "float32",
) -> Manifest:
    config = checkpoint.model.config
    generation = json.loads((output / "generation_config.json").read_text(encoding="utf-8"))
    if checkpoint.architecture == "gpt2":
        layers, heads, hidden = config.n_layer, config.n_head, config.n_embd
        head_size, max_positions = hidden // heads, config.n_positions
    else:
        layers, heads, hidden = config.num_decoder_layers, config.num_heads, config.d_model
        head_size, max_positions = config.d_kv, None

    def token(name: str) -> int | list[int] | None:
        return generation.get(name, getattr(config, name, None))

    def single_token(name: str) -> int | None:
        value = token(name)
        return value[0] if isinstance(value, list) and value else value

    return Manifest(
        architecture=checkpoint.architecture,
        graphs=graphs,
        num_layers=int(layers),
        num_heads=int(heads),
        head_size=int(head_size),
        hidden_size=int(hidden),
        vocab_size=int(config.vocab_size),
        special_tokens=SpecialTokens.with_eos(
            token("eos_token_id"),  # some configs list several EOS ids
            pad_token_id=single_token("pad_token_id"),
            bos_token_id=single_token("bos_token_id"),
            decoder_start_token_id=single_token("decoder_start_token_id"),
        ),
        tokenizer=tokenizer_spec,
        max_positions=max_positions,
        dtype=dtype,
        generation_defaults={
            k: v for k, v in generation.items() if not k.startswith("_") and k != "transformers_version"
        },
        producer=producer_versions(),
        verification=verification,
        optimizations=tuple(optimizations),
        source="onnxgen",
        # Version 2 changed only the fused layout; portable exports stay readable by onnxgen releases before it.
        format_version=FORMAT_VERSION if TOKEN_LOOKUP in optimizations else 1,
    )


def producer_versions() -> dict[str, str]:
    versions = {}
    for package in PRODUCER_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
