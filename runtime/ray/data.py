"""Ray Data: `TextGeneration` as a stateful actor UDF, and the Ray side of `onnxgen batch --ray`.

    import ray
    from onnxgen.ray import map_text_generation

    ds = ray.data.read_parquet("s3://bucket/prompts/")
    ds = map_text_generation(ds, "/models/gpt2", num_actors=8, max_new_tokens=40, seed=7)
    ds.write_parquet("s3://bucket/generations/")

Each actor loads the exported model once, then generates batch after batch: prompts come from one column and
generations go to a new one (a list column with num_generations > 1). The model directory must be readable at the
same path on every node that runs an actor (a shared filesystem, or copied there beforehand).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..batch import BatchOptions, RayOptions, generate_texts
from ..text_generation import TextGeneration
from . import require_ray

logger = logging.getLogger(__name__)


class TextGenerationUDF:
    """For `Dataset.map_batches(TextGenerationUDF, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=N))`.

    Batches may be pyarrow Tables, pandas DataFrames or dicts of NumPy arrays; each comes back as the same kind
    with `output_column` added. `params` are `TextGeneration`'s generation parameters (`num_generations`,
    `seed`, `return_full_text`, ...); a `seed_column` gives each row its own seed.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        column: str = "text",
        output_column: str = "generated",
        seed_column: str | None = None,
        device: str = "auto",
        intra_op_threads: int | None = None,
        truncation: bool = False,
        **params: Any,
    ):
        self.tg = TextGeneration(model_dir, device=device, intra_op_threads=intra_op_threads)
        self.column, self.output_column, self.seed_column = column, output_column, seed_column
        self.truncation, self.params = truncation, params
        self.tg._full_text(params.get("return_full_text"))  # bad parameters fail when the actor starts,
        self.tg.plan({k: v for k, v in params.items() if k != "return_full_text"})  # not at its first batch

    def __call__(self, batch):
        prompts = _column(batch, self.column)
        seeds = None if self.seed_column is None else [_seed(s) for s in _column(batch, self.seed_column)]
        texts = generate_texts(self.tg, prompts, self.params, seeds=seeds, truncation=self.truncation)
        return _with_column(batch, self.output_column, texts)


def map_text_generation(
    ds,
    model_dir: str | Path,
    *,
    num_actors: int = 1,
    batch_size: int = 16,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    intra_op_threads: int | None = None,
    **udf_kwargs: Any,
):
    """`ds` with generations added by `num_actors` actors, each holding `num_cpus`/`num_gpus` and one model.
    onnxruntime gets `intra_op_threads` threads per actor (default: `num_cpus`, so actors do not oversubscribe
    the cores they reserved). `udf_kwargs` go to `TextGenerationUDF` (columns, device, generation parameters)."""
    ray = require_ray()
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors must be an integer >= 1, got {num_actors!r}")
    threads = intra_op_threads or max(1, int(num_cpus))
    return ds.map_batches(
        TextGenerationUDF,
        fn_constructor_args=(os.path.abspath(model_dir),),  # actors may not share this process's cwd
        fn_constructor_kwargs={"intra_op_threads": threads, **udf_kwargs},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def generate_shards(
    model_dir: str | Path,
    prompts: Sequence[str],
    seeds: Sequence[int | None] | None,
    pending: list[tuple[int, int, int]],
    options: BatchOptions,
    ray_options: RayOptions,
    *,
    device: str = "auto",
    intra_op_threads: int | None = None,
    on_rows: Callable[[int], None] = lambda n: None,
) -> Iterator[tuple[int, list]]:
    """`onnxgen batch --ray`: yields (shard index, generations in row order) for each shard in `pending`
    ((index, first row, end row)) as soon as all its rows are back, in whatever order shards finish. Only the
    prompts (and seeds) travel to the cluster; rows are joined with their other columns by the caller."""
    if not pending:
        return
    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_options.address)
    try:
        ds = _dataset(ray, prompts, seeds, pending, options.batch_size)
        ds = map_text_generation(
            ds, model_dir, num_actors=ray_options.num_actors, batch_size=options.batch_size,
            num_cpus=ray_options.num_cpus, num_gpus=ray_options.num_gpus, intra_op_threads=intra_op_threads,
            column="text", output_column="generated", seed_column=None if seeds is None else "seed",
            device=device, truncation=options.truncation, **options.params,
        )
        # No operator after the actors (not even a projection): on a cluster whose CPUs the actors fill, its
        # tasks would wait for them, and shards would come back only at the end instead of as they finish.
        yield from _collect(ds, pending, on_rows)
    finally:
        if started_here:
            ray.shutdown()


def _dataset(ray, prompts, seeds, pending, batch_size: int):
    rows = [r for _, lo, hi in pending for r in range(lo, hi)]
    items = [{"row": r, "text": prompts[r]} if seeds is None else {"row": r, "text": prompts[r], "seed": seeds[r]}
             for r in rows]
    # About one block per batch: blocks are what actors pick up, so they balance the load and stream results.
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    ds.context.enable_progress_bars = False  # the caller shows one bar over rows
    return ds


def _collect(ds, pending, on_rows) -> Iterator[tuple[int, list]]:
    shard_of = {r: index for index, lo, hi in pending for r in range(lo, hi)}
    bounds = {index: (lo, hi) for index, lo, hi in pending}
    done: dict[int, dict[int, Any]] = {index: {} for index in bounds}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows, texts = batch.column("row").to_pylist(), batch.column("generated").to_pylist()
        on_rows(len(rows))
        complete = []
        for row, text in zip(rows, texts):
            index = shard_of[row]
            done[index][row] = text
            lo, hi = bounds[index]
            if len(done[index]) == hi - lo:
                complete.append(index)
        for index in complete:
            lo, hi = bounds[index]
            texts_of = done.pop(index)
            yield index, [texts_of[r] for r in range(lo, hi)]
    if done:
        raise RuntimeError(f"Ray returned no generations for shards {sorted(done)}")


# -- batch formats --------------------------------------------------------------------------------------------
def _column(batch, name: str) -> list:
    if hasattr(batch, "column_names") and hasattr(batch, "column"):  # pyarrow.Table
        if name not in batch.column_names:
            raise KeyError(f"the batch has no column {name!r}; columns: {batch.column_names}")
        return batch.column(name).to_pylist()
    if name not in batch:  # pandas.DataFrame or dict of NumPy arrays
        raise KeyError(f"the batch has no column {name!r}; columns: {list(batch.keys())}")
    return batch[name].tolist()


def _with_column(batch, name: str, values: list):
    if hasattr(batch, "append_column"):  # pyarrow.Table
        import pyarrow as pa

        if name in batch.column_names:
            batch = batch.drop_columns([name])
        return batch.append_column(name, pa.array(values))
    if hasattr(batch, "assign"):  # pandas.DataFrame
        return batch.assign(**{name: values})
    import numpy as np

    column = np.empty(len(values), dtype=object)  # one cell per row, also when cells are lists
    for i, value in enumerate(values):
        column[i] = value
    return {**batch, name: column}


def _seed(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # pandas turns null ints into NaN
        return None
    return int(value)
