"""The manifest: what an exported model directory holds, written by the exporter, checked by the runtime.

An onnxgen model directory contains ``onnxgen.json`` (this manifest), the ONNX graphs, ``config.json``,
``generation_config.json`` and ``tokenizer.json``. A directory written by ``optimum-cli export onnx`` has no
manifest; :func:`manifest_from_optimum_dir` derives one from its ``config.json`` and the graph files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "onnxgen.json"
FORMAT_NAME = "onnxgen"
FORMAT_VERSION = 2  # 2: static-layout graphs take embeddings (TOKEN_LOOKUP); version 1 ones did the lookup
SUPPORTED_ARCHITECTURES = ("gpt2", "t5")

# `Manifest.optimizations` entries. STATIC_KV also names a graph layout: GPT-2's decoder or T5's encoder and
# decoder built by onnxgen.export.builders (GroupQueryAttention over a key/value buffer shared between past and
# present, fed by per-row lengths instead of an attention mask, returning only the last position's logits; T5's
# encoder graph also writes the cross-attention keys/values, and its decoder graph runs the start token too).
FUSED_GQA = "fused-gqa"  # SkipLayerNormalization, FastGelu, packed QKV into GroupQueryAttention
LAST_LOGITS = "last-logits"  # logits (batch, vocab) of each row's last valid position only, and their log_softmax
STATIC_KV = "static-kv"  # past_key_values.* (batch, heads, max_length, head_size) are written in place
# The graphs take `inputs_embeds` (batch, sequence, hidden) instead of `input_ids`: the runtime reads the rows it
# needs from TOKEN_EMBEDDINGS_FILE, a (vocab, hidden) .npy, so no session holds the table for a lookup, and a tied
# LM head reads the same file, packed once by onnxruntime, instead of the table being held twice.
TOKEN_LOOKUP = "runtime-token-lookup"
TOKEN_EMBEDDINGS_FILE = "token_embeddings.npy"

# Hugging Face model types that share GPT-2's or T5's graph layout.
_MODEL_TYPE_TO_ARCHITECTURE = {"gpt2": "gpt2", "t5": "t5", "mt5": "t5"}


class ManifestError(ValueError):
    """The model directory is not one onnxgen can load; the message says what is missing or different."""


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its file and the input/output names the runtime will bind."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class SpecialTokens:
    eos_token_id: int | None  # the first EOS id: what GPT-2 pads with, as in transformers
    pad_token_id: int | None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    # Where the model's config lists several EOS ids, the rest: a sequence ends at any of them. Written only when
    # there are some, so a single-EOS manifest stays readable by onnxgen versions that predate it.
    other_eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "other_eos_token_ids", tuple(int(t) for t in self.other_eos_token_ids))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return () if self.eos_token_id is None else (self.eos_token_id, *self.other_eos_token_ids)

    @classmethod
    def with_eos(cls, eos: int | list[int] | None, **others: int | None) -> SpecialTokens:
        """From a config's eos_token_id, which may be one id or a list of them."""
        if isinstance(eos, (list, tuple)):
            return cls(eos_token_id=eos[0] if eos else None, other_eos_token_ids=tuple(eos[1:]), **others)
        return cls(eos_token_id=eos, **others)


@dataclass(frozen=True)
class TokenizerSpec:
    file: str = "tokenizer.json"
    # transformers' decode() post-processing that the `tokenizers` library does not do itself.
    clean_up_tokenization_spaces: bool = False
    add_special_tokens: bool = True
    # GPT-2 has no padding token; batches are padded with this id on the left.
    padding_side: str = "left"
    # transformers' split_special_tokens (tokenizer_config.json, not tokenizer.json): special tokens written in a
    # prompt's text are plain text, not control tokens. Written only when set, so older onnxgen still loads.
    split_special_tokens: bool = False


@dataclass(frozen=True)
class Manifest:
    architecture: str  # "gpt2" (decoder-only) or "t5" (encoder-decoder)
    # gpt2: {"decoder"}; t5: {"encoder", "decoder", "decoder_with_past"}, or {"encoder", "decoder"} with STATIC_KV
    graphs: dict[str, GraphSpec]
    num_layers: int
    num_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    special_tokens: SpecialTokens
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    max_positions: int | None = None  # GPT-2's n_positions; T5 has relative positions and no limit
    dtype: str = "float32"
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, str] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    optimizations: tuple[str, ...] = ()
    source: str = "onnxgen"  # "onnxgen" or "optimum" (derived from an optimum export without a manifest)
    format_version: int = FORMAT_VERSION

    @property
    def is_encoder_decoder(self) -> bool:
        return self.architecture == "t5"

    @property
    def has_static_kv(self) -> bool:
        """The decoder takes the static key/value layout (see STATIC_KV) instead of optimum's."""
        return STATIC_KV in self.optimizations

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["graphs"] = {name: dataclasses.asdict(spec) for name, spec in self.graphs.items()}
        if not self.special_tokens.other_eos_token_ids:
            del data["special_tokens"]["other_eos_token_ids"]
        if not self.tokenizer.split_special_tokens:
            del data["tokenizer"]["split_special_tokens"]
        data["format"] = FORMAT_NAME
        return data

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise ManifestError(f"{MANIFEST_FILE}: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ManifestError(
                f"{MANIFEST_FILE}: format_version {version!r} is not supported by this onnxgen "
                f"(it reads versions up to {FORMAT_VERSION}); upgrade onnxgen or re-export the model"
            )
        try:
            arch = data["architecture"]
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ManifestError(
                    f"{MANIFEST_FILE}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            graphs = {
                name: GraphSpec(file=g["file"], inputs=tuple(g["inputs"]), outputs=tuple(g["outputs"]))
                for name, g in data["graphs"].items()
            }
            return cls(
                architecture=arch,
                graphs=graphs,
                num_layers=int(data["num_layers"]),
                num_heads=int(data["num_heads"]),
                head_size=int(data["head_size"]),
                hidden_size=int(data["hidden_size"]),
                vocab_size=int(data["vocab_size"]),
                special_tokens=SpecialTokens(**data["special_tokens"]),
                tokenizer=TokenizerSpec(**data.get("tokenizer", {})),
                max_positions=data.get("max_positions"),
                dtype=data.get("dtype", "float32"),
                generation_defaults=dict(data.get("generation_defaults", {})),
                producer=dict(data.get("producer", {})),
                verification=dict(data.get("verification", {})),
                optimizations=tuple(data.get("optimizations", ())),
                source=data.get("source", "onnxgen"),
                format_version=version,
            )
        except KeyError as exc:
            raise ManifestError(f"{MANIFEST_FILE}: missing field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ManifestError(f"{MANIFEST_FILE}: malformed field: {exc}") from None


def required_graphs(architecture: str, static_kv: bool = False) -> tuple[str, ...]:
    if architecture == "gpt2":
        return ("decoder",)
    # T5's static layout has no separate first-step graph: the decoder graph runs the start token too.
    return ("encoder", "decoder") if static_kv else ("encoder", "decoder", "decoder_with_past")


def expected_io(manifest: Manifest) -> dict[str, tuple[set[str], set[str]]]:
    """The input and output names each graph must have, derived from the layer count and the layout."""
    n = manifest.num_layers
    if manifest.architecture == "gpt2":
        past = {f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")}
        present = {f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")}
        if manifest.has_static_kv:
            lengths = {"inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"}
            return {"decoder": (lengths | past, {"logits", "logprobs"} | present)}
        return {"decoder": ({"input_ids", "attention_mask", "position_ids"} | past, {"logits"} | present)}
    self_past = {f"past_key_values.{i}.decoder.{kv}" for i in range(n) for kv in ("key", "value")}
    cross_past = {f"past_key_values.{i}.encoder.{kv}" for i in range(n) for kv in ("key", "value")}
    self_present = {f"present.{i}.decoder.{kv}" for i in range(n) for kv in ("key", "value")}
    cross_present = {f"present.{i}.encoder.{kv}" for i in range(n) for kv in ("key", "value")}
    if manifest.has_static_kv:  # the encoder graph projects the cross-attention keys/values itself
        lengths = {"inputs_embeds", "encoder_attention_mask", "seqlens_k", "total_sequence_length"}
        return {
            "encoder": ({"inputs_embeds", "attention_mask"}, cross_present),
            "decoder": (lengths | self_past | cross_past, {"logits", "logprobs"} | self_present),
        }
    return {
        "encoder": ({"input_ids", "attention_mask"}, {"last_hidden_state"}),
        "decoder": (
            {"input_ids", "encoder_attention_mask", "encoder_hidden_states"},
            {"logits"} | self_present | cross_present,
        ),
        "decoder_with_past": (
            {"input_ids", "encoder_attention_mask"} | self_past | cross_past,
            {"logits"} | self_present,
        ),
    }


def check_graph_io(manifest: Manifest, name: str, inputs: list[str], outputs: list[str]) -> None:
    """Raise ManifestError naming every difference between a loaded graph and what the manifest promises."""
    spec = manifest.graphs[name]
    need_in, need_out = expected_io(manifest)[name]
    problems = []
    if set(inputs) != set(spec.inputs):
        problems.append(f"inputs {sorted(set(inputs) ^ set(spec.inputs))} differ from the manifest")
    if set(outputs) != set(spec.outputs):
        problems.append(f"outputs {sorted(set(outputs) ^ set(spec.outputs))} differ from the manifest")
    missing_in = need_in - set(inputs)
    if missing_in:
        problems.append(f"missing inputs {sorted(missing_in)} (expected for {manifest.num_layers} layers)")
    missing_out = need_out - set(outputs)
    if missing_out:
        problems.append(f"missing outputs {sorted(missing_out)} (expected for {manifest.num_layers} layers)")
    if problems:
        raise ManifestError(f"graph {name!r} ({spec.file}): " + "; ".join(problems))


def load_manifest(directory: str | Path) -> Manifest:
    """Read the manifest of an onnxgen directory, or derive one for an optimum export, and check that this onnxgen
    can load the directory (:func:`check_directory`)."""
    manifest = read_manifest(directory)
    check_directory(manifest, directory)
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an onnxgen directory, or one derived for an optimum export, without checking its files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"model directory {str(directory)!r} does not exist or is not a directory")
    path = directory / MANIFEST_FILE
    if path.exists():
        manifest = Manifest.from_dict(_read_json_object(path))
    elif (directory / "config.json").exists():
        manifest = manifest_from_optimum_dir(directory)
    else:
        raise ManifestError(
            f"{str(directory)!r} holds neither {MANIFEST_FILE} nor config.json; "
            "export a model first with `onnxgen export SOURCE OUTPUT_DIR`"
        )
    return manifest


def check_directory(manifest: Manifest, directory: str | Path) -> None:
    """Raise ManifestError unless this onnxgen can load `directory`: its format, graphs and tokenizer."""
    directory = Path(directory)
    if manifest.has_static_kv:
        if TOKEN_LOOKUP not in manifest.optimizations:
            precision = {"float32": "fp32", "float16": "fp16"}.get(manifest.dtype, manifest.dtype)
            raise ManifestError(
                f"{str(directory)!r} holds fused graphs of an older onnxgen whose graphs look tokens up themselves; "
                f"re-export it: `onnxgen export SOURCE {directory} --force --optimize fused --precision {precision}`"
            )
        if not (directory / TOKEN_EMBEDDINGS_FILE).exists():
            raise ManifestError(f"the token table {TOKEN_EMBEDDINGS_FILE!r} is missing from {str(directory)!r}")
    for name in required_graphs(manifest.architecture, manifest.has_static_kv):
        if name not in manifest.graphs:
            raise ManifestError(f"{MANIFEST_FILE}: the {manifest.architecture} layout needs a {name!r} graph")
        if not (directory / manifest.graphs[name].file).exists():
            raise ManifestError(f"graph file {manifest.graphs[name].file!r} named in the manifest is missing")
    if not (directory / manifest.tokenizer.file).exists():
        raise ManifestError(f"tokenizer file {manifest.tokenizer.file!r} is missing from {str(directory)!r}")


def _optimum_graph_files(directory: Path, architecture: str) -> dict[str, str]:
    if architecture == "gpt2":
        for candidate in ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx"):
            if (directory / candidate).exists():
                return {"decoder": candidate}
        raise ManifestError(f"{str(directory)!r}: no GPT-2 graph with past key values (model.onnx) found")
    files = {
        "encoder": "encoder_model.onnx",
        "decoder": "decoder_model.onnx",
        "decoder_with_past": "decoder_with_past_model.onnx",
    }
    missing = [f for f in files.values() if not (directory / f).exists()]
    if missing:
        raise ManifestError(
            f"{str(directory)!r}: an optimum T5 export needs {sorted(files.values())}; missing {missing} "
            "(export with --task text2text-generation-with-past)"
        )
    return files


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def manifest_from_optimum_dir(directory: str | Path) -> Manifest:
    """Describe a directory written by `optimum-cli export onnx` for GPT-2 or T5 (with past key values)."""
    directory = Path(directory)
    config = _read_json_object(directory / "config.json")
    try:
        return _manifest_from_optimum_config(directory, config)
    except KeyError as exc:
        raise ManifestError(f"{directory / 'config.json'}: the field {exc.args[0]!r} is missing") from None


def _manifest_from_optimum_config(directory: Path, config: dict[str, Any]) -> Manifest:
    model_type = config.get("model_type")
    architecture = _MODEL_TYPE_TO_ARCHITECTURE.get(model_type)
    if architecture is None:
        raise ManifestError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(_MODEL_TYPE_TO_ARCHITECTURE))}"
        )
    gen_path = directory / "generation_config.json"
    generation = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    tok_config_path = directory / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.exists() else {}
    files = _optimum_graph_files(directory, architecture)
    if architecture == "gpt2":
        layers, heads, hidden = config["n_layer"], config["n_head"], config["n_embd"]
        head_size = hidden // heads
        max_positions = config.get("n_positions")
    else:
        layers, heads, hidden = config["num_decoder_layers"] or config["num_layers"], config["num_heads"], config["d_model"]
        head_size = config["d_kv"]
        max_positions = None
    # The names optimum gives these graphs follow from the layer count; the sessions are checked against them
    # at load, so an export with other names fails there with the difference spelled out.
    names = expected_io(_layout_only(architecture, int(layers)))
    graphs = {
        name: GraphSpec(file=file, inputs=tuple(sorted(names[name][0])), outputs=tuple(sorted(names[name][1])))
        for name, file in files.items()
    }
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    return Manifest(
        architecture=architecture,
        graphs=graphs,
        num_layers=int(layers),
        num_heads=int(heads),
        head_size=int(head_size),
        hidden_size=int(hidden),
        vocab_size=int(config["vocab_size"]),
        special_tokens=SpecialTokens.with_eos(
            eos,
            pad_token_id=pad,
            bos_token_id=generation.get("bos_token_id", config.get("bos_token_id")),
            decoder_start_token_id=generation.get("decoder_start_token_id", config.get("decoder_start_token_id")),
        ),
        tokenizer=TokenizerSpec(
            clean_up_tokenization_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)),
            split_special_tokens=bool(tok_config.get("split_special_tokens", False)),
        ),
        max_positions=max_positions,
        generation_defaults={k: v for k, v in generation.items() if not k.startswith("_") and k != "transformers_version"},
        producer={"optimum": "unknown"},
        source="optimum",
    )


def _layout_only(architecture: str, num_layers: int) -> Manifest:
    """A placeholder manifest carrying just what `expected_io` reads."""
    return Manifest(
        architecture=architecture, graphs={}, num_layers=num_layers, num_heads=0, head_size=0, hidden_size=0,
        vocab_size=0, special_tokens=SpecialTokens(eos_token_id=None, pad_token_id=None),
    )
