"""Offline batch generation over a JSONL or Parquet file, with resumable sharded output.

    onnxgen batch models/gpt2 prompts.jsonl out/ --column text --max-new-tokens 40 --seed 7

The input's rows are cut, in file order, into shards of `shard_size` rows. Each finished shard is written to
OUTPUT/part-NNNNN.{jsonl,parquet} atomically (a temporary file renamed into place) and then recorded in
OUTPUT/_onnxgen_batch.json. A rerun with the same settings skips the recorded shards and rewrites any other, so
an interrupted run loses at most the shards in flight and no row is ever written twice. Output rows keep their
input columns and gain `output_column`: a string, or a list of strings with `num_generations > 1`.

Generation runs in this process, or on Ray (`ray_options=RayOptions(...)`, needs the `ray` extra), where each
actor loads the model once. A seed (`seed` parameter, or a per-row `seed_column`) fixes every row's output
whatever shares its batch, so both give the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .generator import Generator
from .params import config_from_kwargs
from .text_generation import TextGeneration

logger = logging.getLogger(__name__)

MANIFEST = "_onnxgen_batch.json"
FORMAT_VERSION = 1
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class BatchOptions:
    """How rows become generations. All but `batch_size` are stored in the manifest: a rerun must match them."""

    column: str = "text"  # the prompts
    output_column: str = "generated"  # str per row, or list[str] with num_generations > 1
    seed_column: str | None = None  # an int per row, overriding params["seed"] (None in a row: params["seed"])
    shard_size: int = 1000  # rows per output file
    batch_size: int = 16  # prompts generated together
    output_format: str | None = None  # "jsonl" or "parquet"; None: the input's
    truncation: bool = False  # crop prompts that do not fit the context (else the run stops with an error)
    params: dict[str, Any] = field(default_factory=dict)  # generation parameters, as `TextGeneration` takes them

    def __post_init__(self):
        for name in ("shard_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.output_format not in (None, "jsonl", "parquet"):
            raise ValueError(f"output_format must be 'jsonl' or 'parquet', got {self.output_format!r}")
        if self.output_column in (self.column, self.seed_column):
            raise ValueError(f"output_column {self.output_column!r} would overwrite an input column")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run on Ray (see `onnxgen.ray.data`)."""

    address: str | None = None  # None: the running cluster if any (RAY_ADDRESS), else a local one
    num_actors: int = 1  # model copies; each loads the model once
    num_cpus: float = 1.0  # reserved per actor; also onnxruntime's thread count unless intra_op_threads is set
    num_gpus: float = 0.0  # reserved per actor (with device="cuda")


@dataclass(frozen=True)
class BatchSummary:
    rows: int
    shards: int
    skipped_shards: int  # finished by an earlier run
    written_shards: int
    seconds: float
    files: list[Path]  # every finished shard, in order


def generate_texts(
    tg: TextGeneration,
    prompts: Sequence[str],
    params: dict[str, Any],
    *,
    seeds: Sequence[int | None] | None = None,
    truncation: bool = False,
) -> list[str | list[str]]:
    """One generation per prompt (a list of `num_generations` strings when it is > 1). `seeds`, one per prompt,
    override `params["seed"]` row by row; rows then run with their own plans in one batch."""
    params = dict(params)
    return_full_text = params.pop("return_full_text", None)
    if seeds is None or all(s is None for s in seeds):
        return list(tg(list(prompts), return_full_text=return_full_text, truncation=truncation, **params))
    plans = [tg.plan({**params, "seed": params.get("seed") if s is None else s}) for s in seeds]
    full_text = tg._full_text(return_full_text)
    ids = tg.encode(list(prompts), plans[0], truncation)  # the seed plays no part in the context check
    generator = Generator(tg.model, tg.tokenizer.decode)
    generator.start(ids, plans)
    while not generator.is_done():
        generator.step()
    texts = []
    for prompt_ids, outputs, plan in zip(ids, generator.results(), plans):
        row = [tg._generation(prompt_ids, out, full_text, plan).text for out in outputs]
        texts.append(row if plan.num_return_sequences > 1 else row[0])
    return texts


def run_batch(
    model_dir: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    options: BatchOptions | None = None,
    *,
    ray_options: RayOptions | None = None,
    device: str = "auto",
    intra_op_threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Generate for every row of `input_path` into `output_dir`, skipping shards an earlier run finished."""
    started = time.perf_counter()
    options = options or BatchOptions()
    config_from_kwargs({k: v for k, v in options.params.items() if k != "return_full_text"})  # fail fast
    input_path = Path(input_path)
    rows = read_rows(input_path)
    prompts, seeds = _column_values(rows, options, input_path)
    fmt = options.output_format or input_format(input_path)
    settings = _settings(model_dir, prompts, seeds, fmt, options)
    schema = _pyarrow("writing Parquet").Table.from_pylist(rows).schema if fmt == "parquet" else None
    output = ShardedOutput(output_dir, settings, fmt, overwrite, input_schema=schema)
    bounds = [(i, i * options.shard_size, min(len(rows), (i + 1) * options.shard_size))
              for i in range(math.ceil(len(rows) / options.shard_size))]
    pending = [b for b in bounds if not output.is_finished(b[0])]
    logger.info("%d rows in %d shards; %d finished earlier, %d to generate", len(rows), len(bounds),
                len(bounds) - len(pending), len(pending))
    bar = _Progress(len(rows), len(rows) - sum(hi - lo for _, lo, hi in pending), progress)
    if ray_options is not None:
        from .ray.data import generate_shards

        shards = generate_shards(model_dir, prompts, seeds, pending, options, ray_options,
                                 device=device, intra_op_threads=intra_op_threads, on_rows=bar.update)
    else:
        shards = _generate_in_process(model_dir, prompts, seeds, pending, options, device, intra_op_threads,
                                      bar.update)
    try:
        for index, texts in shards:
            _, lo, hi = bounds[index]
            output.write(index, rows[lo:hi], options.output_column, texts)
            bar.shard_done(index, len(bounds))
    finally:
        bar.close()
        getattr(shards, "close", lambda: None)()  # stop a Ray run that was interrupted
    return BatchSummary(len(rows), len(bounds), len(bounds) - len(pending), len(pending),
                        time.perf_counter() - started, output.files(len(bounds)))


def _generate_in_process(model_dir, prompts, seeds, pending, options, device, intra_op_threads, on_rows):
    """Yields (shard index, generations) shard after shard."""
    if not pending:
        return
    tg = TextGeneration(model_dir, device=device, intra_op_threads=intra_op_threads)
    for index, lo, hi in pending:
        texts: list = []
        for start in range(lo, hi, options.batch_size):
            end = min(hi, start + options.batch_size)
            texts += generate_texts(tg, prompts[start:end], options.params,
                                    seeds=None if seeds is None else seeds[start:end], truncation=options.truncation)
            on_rows(end - start)
        yield index, texts


# -- input ----------------------------------------------------------------------------------------------------
def input_format(path: Path) -> str:
    if path.is_dir():
        # a folder of part files, as Spark and Ray write them; names without a known suffix are Parquet parts
        formats = {FORMATS.get(part.suffix.lower(), "parquet") for part in _part_files(path)}
        if len(formats) > 1:
            raise ValueError(f"{path} mixes JSONL and Parquet files; give a folder of one format")
        return formats.pop() if formats else "parquet"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path}: name it *.jsonl or *.parquet "
                         f"(known suffixes: {', '.join(FORMATS)})")
    return fmt


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file (one JSON object a line) or a Parquet file/folder, in file order."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if input_format(path) == "parquet":
        rows = _pyarrow("reading Parquet").parquet.read_table(path).to_pylist()
    elif path.is_dir():
        rows = [row for part in _part_files(path) for row in _jsonl_rows(part)]
    else:
        rows = list(_jsonl_rows(path))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _part_files(folder: Path) -> list[Path]:
    """A folder's data files in name order; markers and hidden files (_SUCCESS, .crc) are not data."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(("_", ".")))


def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):  # bad data, not a bad argument: ValueError
                kind = type(row).__name__
                raise ValueError(f"{path} line {number} must be a JSON object, got {kind}")  # noqa: TRY004
            yield row


def _column_values(rows, options: BatchOptions, path: Path) -> tuple[list[str], list[int | None] | None]:
    """Checked before anything runs, so a bad row stops the run at once and by its number."""
    prompts, seeds = [], None if options.seed_column is None else []
    for i, row in enumerate(rows):
        if options.output_column in row:
            raise ValueError(f"{path} row {i} already has the output column {options.output_column!r}; "
                             "pick another with output_column (--output-column)")
        prompt = row.get(options.column)
        if not isinstance(prompt, str) or not prompt:
            columns = ", ".join(map(repr, row)) or "none"
            raise ValueError(f"{path} row {i}: column {options.column!r} must be a non-empty string, got "
                             f"{prompt!r} (columns: {columns})")
        prompts.append(prompt)
        if seeds is not None:
            seed = row.get(options.seed_column)
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
                raise ValueError(f"{path} row {i}: seed column {options.seed_column!r} must hold integers >= 0 "
                                 f"or null, got {seed!r}")
            seeds.append(seed)
    return prompts, seeds


def _settings(model_dir, prompts: list[str], seeds: list | None, fmt: str, options: BatchOptions) -> dict[str, Any]:
    """What a rerun must match to resume: the options, the model, and the prompts (and seeds) themselves, so an
    edited or reordered input is caught, while a moved or converted one is not."""
    settings = asdict(options)
    del settings["batch_size"]  # how fast, not what: a rerun may change it
    digest = hashlib.sha256(json.dumps([prompts, seeds], ensure_ascii=False).encode("utf-8")).hexdigest()
    settings.update(model=str(Path(model_dir).resolve()), rows=len(prompts), prompts_sha256=digest,
                    output_format=fmt)
    return json.loads(json.dumps(settings, default=str))  # as the manifest will read back


def _pyarrow(purpose: str):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError(f"{purpose} needs pyarrow: pip install pyarrow (or onnxgen[ray])") from None
    return pyarrow


# -- output ---------------------------------------------------------------------------------------------------
class ShardedOutput:
    """OUTPUT/part-NNNNN.<fmt> files and the manifest that says which of them are finished."""

    def __init__(self, directory: str | Path, settings: dict[str, Any], fmt: str, overwrite: bool = False,
                 input_schema=None):
        self.directory, self.settings, self.fmt = Path(directory), settings, fmt
        self.input_schema = input_schema  # Parquet: one schema for every shard, whatever their nulls
        self.manifest_path = self.directory / MANIFEST
        self.finished: dict[str, int] = {}  # file name -> rows
        if self.manifest_path.exists():
            self._resume(overwrite)
        elif self.directory.exists() and any(self.directory.iterdir()):
            raise FileExistsError(f"{self.directory} is not empty and holds no {MANIFEST}, so it is not an onnxgen "
                                  "batch output; choose an empty or new directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".part-*.tmp"):
            stale.unlink()  # left by a run that died mid-write
        self._save_manifest()

    def _resume(self, overwrite: bool) -> None:
        if overwrite:
            for old in self.directory.glob("part-*"):
                old.unlink()
            logger.info("overwrite: removed the earlier run's shards from %s", self.directory)
            return
        manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        earlier = manifest.get("settings", {})
        differ = sorted(k for k in self.settings.keys() | earlier.keys() if self.settings.get(k) != earlier.get(k))
        if differ:
            details = "; ".join(f"{k}: was {earlier.get(k)!r}, now {self.settings.get(k)!r}" for k in differ)
            raise ValueError(f"{self.directory} holds a run with other settings ({details}); rerun with those "
                             "settings to resume, choose another output directory, or pass overwrite (--overwrite)")
        self.finished = {name: rows for name, rows in manifest.get("finished", {}).items()
                         if (self.directory / name).exists()}

    def name(self, index: int) -> str:
        return f"part-{index:05d}.{self.fmt}"

    def is_finished(self, index: int) -> bool:
        return self.name(index) in self.finished

    def files(self, count: int) -> list[Path]:
        return [self.directory / self.name(i) for i in range(count) if self.is_finished(i)]

    def write(self, index: int, rows: list[dict[str, Any]], column: str, values: list) -> None:
        """The shard's file in place first, then the manifest: a crash between the two only redoes the shard."""
        name = self.name(index)
        _atomic_write(self.directory / name, lambda tmp: self._write_rows(tmp, rows, column, values))
        self.finished[name] = len(rows)
        self._save_manifest()

    def _write_rows(self, path: Path, rows: list[dict[str, Any]], column: str, values: list) -> None:
        if self.fmt == "parquet":
            pa = _pyarrow("writing Parquet")
            table = pa.Table.from_pylist(rows, schema=self.input_schema)
            pa.parquet.write_table(table.append_column(column, pa.array(values)), path)
            return
        with path.open("w", encoding="utf-8") as out:
            for row, value in zip(rows, values):
                out.write(json.dumps({**row, column: value}, ensure_ascii=False, default=str) + "\n")

    def _save_manifest(self) -> None:
        body = {"format_version": FORMAT_VERSION, "settings": self.settings,
                "finished": dict(sorted(self.finished.items()))}
        text = json.dumps(body, indent=2, ensure_ascii=False) + "\n"
        _atomic_write(self.manifest_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Progress:
    """A tqdm bar over rows when tqdm is installed; a log line per shard either way."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.started = total, done, time.perf_counter()
        self.first = done
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                logger.info("install tqdm for a progress bar; logging a line per shard instead")
            else:
                self.bar = tqdm(total=total, initial=done, unit="row", desc="generating")

    def update(self, rows: int) -> None:
        self.done += rows
        if self.bar is not None:
            self.bar.update(rows)

    def shard_done(self, index: int, shards: int) -> None:
        rate = (self.done - self.first) / max(time.perf_counter() - self.started, 1e-9)
        logger.info("shard %d/%d written: %d/%d rows (%.1f rows/s)", index + 1, shards, self.done, self.total, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
