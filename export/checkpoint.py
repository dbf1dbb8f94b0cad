"""Load a checkpoint (Hub id or local folder) for export, turning loader failures into one-line ExportErrors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxgen.export.errors import ExportError
from onnxgen.manifest import _MODEL_TYPE_TO_ARCHITECTURE as MODEL_TYPE_TO_ARCHITECTURE

# The optimum task that gives each layout its graphs with past key values.
TASKS = {"gpt2": "text-generation-with-past", "t5": "text2text-generation-with-past"}


@dataclass
class Checkpoint:
    source: str
    architecture: str  # "gpt2" or "t5"
    model: Any  # a transformers PreTrainedModel in float32, eval mode
    tokenizer: Any  # a transformers PreTrainedTokenizerFast

    @property
    def task(self) -> str:
        return TASKS[self.architecture]


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def looks_like_path(source: str) -> bool:
    """True for sources that cannot be Hub ids ("org/name" or "name"), so a missing folder is the user's typo."""
    return source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or "\\" in source


def load_architecture(source: str) -> str:
    """Read only the config (cheap) and return the onnxgen layout, refusing unsupported model types."""
    from transformers import AutoConfig

    if not is_local(source) and looks_like_path(source):
        raise ExportError(f"source {source!r} looks like a folder but does not exist")
    with translate_load_errors(source):
        config = AutoConfig.from_pretrained(source)
    model_type = getattr(config, "model_type", None)
    architecture = MODEL_TYPE_TO_ARCHITECTURE.get(model_type)
    if architecture is None:
        raise ExportError(
            f"model_type {model_type!r} of {source!r} is not supported; onnxgen exports the model types "
            f"{', '.join(sorted(MODEL_TYPE_TO_ARCHITECTURE))}"
        )
    return architecture


def load_checkpoint(source: str, architecture: str) -> Checkpoint:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    loader = AutoModelForCausalLM if architecture == "gpt2" else AutoModelForSeq2SeqLM
    with translate_load_errors(source):
        options = _attention_options(AutoConfig.from_pretrained(source), architecture)
        # transformers < 5 loads float32 unless asked otherwise; .float() makes that explicit for fp16 checkpoints.
        model = loader.from_pretrained(source, **options).float().eval()
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            f"the tokenizer of {source!r} ({type(tokenizer).__name__}) has no fast (tokenizers) version; "
            "onnxgen needs a tokenizer.json (install sentencepiece so it can be converted)"
        )
    return Checkpoint(source=source, architecture=architecture, model=model, tokenizer=tokenizer)


def _attention_options(config: Any, architecture: str) -> dict[str, str]:
    """GPT-2 configs that change how attention scores are scaled load with eager attention: the SDPA path that
    transformers picks by default ignores scale_attn_weights=False and scale_attn_by_inverse_layer_idx=True in the
    versions the exporter pins (< 4.58; huggingface/transformers#44380, fixed later by #44397), so optimum's
    graphs and the export check would follow a model the config does not describe. The fused graphs implement
    the config; with this, optimum's export and the check against PyTorch do too."""
    if architecture == "gpt2" and (
        not getattr(config, "scale_attn_weights", True) or getattr(config, "scale_attn_by_inverse_layer_idx", False)
    ):
        return {"attn_implementation": "eager"}
    return {}


_HUB_UNREACHABLE = (
    "cannot fetch {source!r}: the Hugging Face Hub is unreachable from here (no network, or HF_HUB_OFFLINE=1) and "
    "{source!r} is not in the local cache; export from a folder instead: on a machine with access save the "
    "checkpoint with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), copy DIR here, then run "
    "`onnxgen export DIR OUTPUT_DIR`"
)


@contextlib.contextmanager
def translate_load_errors(source: str) -> Iterator[None]:
    """Turn the loaders' (often multi-line) Hub and file errors into one ExportError line."""
    try:
        yield
    except ExportError:
        raise
    except (OSError, ValueError) as exc:
        chain = list(_exception_chain(exc))
        if any(_is_offline_error(e) for e in chain):
            raise ExportError(_HUB_UNREACHABLE.format(source=source)) from exc
        if any(type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError") for e in chain) and not is_local(
            source
        ):
            raise ExportError(
                f"source {source!r} is neither a local folder nor a model this machine may download from the "
                "Hugging Face Hub (check the spelling, or log in with `hf auth login` for a gated model)"
            ) from exc
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"cannot load {source!r}: {first_line}") from exc


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_offline_error(exc: BaseException) -> bool:
    # Matched by name: which HTTP client huggingface_hub uses (requests, httpx) depends on its version.
    offline_names = {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectTimeout",
        "ConnectError",
        "ReadTimeout",
        "Timeout",
        "TimeoutException",
        "NameResolutionError",
        "MaxRetryError",
    }
    if any(cls.__name__ in offline_names for cls in type(exc).__mro__):
        return True
    return "couldn't connect to" in str(exc)
