"""`onnxgen batch` in process: sharded output that matches the API row for row, and resumes without losing or
repeating a row after an interruption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxgen.batch as batch_module
import pytest
from onnxgen import TextGeneration
from onnxgen.batch import MANIFEST, BatchOptions, run_batch

PARAMS = {"max_new_tokens": 5, "do_sample": True, "seed": 11}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_output(directory: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(directory.glob("part-*.jsonl")) for line in part.open()]


def prompts(n: int) -> list[dict]:
    words = ["The café", "Prices rose", "summarize: a text", "Once upon", "Das Mädchen", "I love pizza 🍕"]
    return [{"id": i, "text": f"{words[i % len(words)]} {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def tg(tiny_gpt2_onnx) -> TextGeneration:
    return TextGeneration(tiny_gpt2_onnx, device="cpu")


def test_rows_keep_their_columns_and_equal_the_api(tiny_gpt2_onnx, tg, tmp_path):
    rows = prompts(23)
    summary = run_batch(tiny_gpt2_onnx, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out",
                        BatchOptions(shard_size=10, batch_size=4, params=PARAMS), device="cpu", progress=False)
    assert (summary.rows, summary.shards, summary.written_shards) == (23, 3, 3)
    assert [f.name for f in summary.files] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    out = read_output(tmp_path / "out")
    assert [r["id"] for r in out] == list(range(23)) and all(r["text"] == rows[r["id"]]["text"] for r in out)
    # Seeded rows do not depend on the batch they ran in: one call over all prompts gives the same text.
    assert [r["generated"] for r in out] == tg([r["text"] for r in rows], **PARAMS)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["finished"] == {"part-00000.jsonl": 10, "part-00001.jsonl": 10, "part-00002.jsonl": 3}


def test_a_folder_of_jsonl_parts_is_read_in_name_order(tiny_gpt2_onnx, tmp_path):
    rows, folder = prompts(7), tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "part-00001.jsonl", rows[4:])
    write_jsonl(folder / "part-00000.jsonl", rows[:4])
    (folder / "_SUCCESS").write_text("")
    run_batch(tiny_gpt2_onnx, folder, tmp_path / "out", BatchOptions(params=PARAMS), device="cpu", progress=False)
    run_batch(tiny_gpt2_onnx, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "one", BatchOptions(params=PARAMS),
              device="cpu", progress=False)
    assert read_output(tmp_path / "out") == read_output(tmp_path / "one")
    assert [r["id"] for r in read_output(tmp_path / "out")] == list(range(7))
    (folder / "extra.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes JSONL and Parquet"):
        run_batch(tiny_gpt2_onnx, folder, tmp_path / "mixed", BatchOptions(params=PARAMS), device="cpu", progress=False)


def test_a_seed_column_seeds_each_row(tiny_t5_onnx, tmp_path):
    rows = [{"text": "summarize: a text", "seed": s} for s in (1, 2, None, 1)]
    options = BatchOptions(seed_column="seed", params={**PARAMS, "num_generations": 2})
    run_batch(tiny_t5_onnx, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", options, device="cpu",
              progress=False)
    out = [r["generated"] for r in read_output(tmp_path / "out")]
    tg = TextGeneration(tiny_t5_onnx, device="cpu")
    expected = [tg("summarize: a text", **{**PARAMS, "num_generations": 2, "seed": s}) for s in (1, 2, 11, 1)]
    assert out == expected and out[0] != out[1] and all(len(gens) == 2 for gens in out)


def test_an_interrupted_run_resumes_without_losing_or_repeating_rows(tiny_gpt2_onnx, tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", prompts(25))
    options = BatchOptions(shard_size=5, batch_size=5, params=PARAMS)
    calls = []
    real = batch_module.generate_texts

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third shard generates
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_module, "generate_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(tiny_gpt2_onnx, source, tmp_path / "out", options, device="cpu", progress=False)
    out_dir = tmp_path / "out"
    assert sorted(json.loads((out_dir / MANIFEST).read_text())["finished"]) == ["part-00000.jsonl", "part-00001.jsonl"]
    # A crash between renaming a shard into place and recording it, and one in the middle of a write.
    (out_dir / "part-00003.jsonl").write_text('{"id": 15, "generated": "stale"}\n')
    (out_dir / ".part-00004.jsonl.123.tmp").write_text("half a line")

    calls.clear()
    monkeypatch.setattr(batch_module, "generate_texts", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    summary = run_batch(tiny_gpt2_onnx, source, out_dir, options, device="cpu", progress=False)
    assert (summary.skipped_shards, summary.written_shards, sum(calls)) == (2, 3, 15)
    resumed = read_output(out_dir)
    assert [r["id"] for r in resumed] == list(range(25))
    assert not list(out_dir.glob(".*.tmp"))
    fresh = run_batch(tiny_gpt2_onnx, source, tmp_path / "fresh", options, device="cpu", progress=False)
    assert resumed == read_output(tmp_path / "fresh") and fresh.written_shards == 5


def test_a_rerun_with_other_settings_is_refused_unless_overwritten(tiny_gpt2_onnx, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    run_batch(tiny_gpt2_onnx, source, tmp_path / "out", BatchOptions(params=PARAMS), device="cpu", progress=False)
    other = BatchOptions(params={**PARAMS, "max_new_tokens": 3})
    with pytest.raises(ValueError, match="holds a run with other settings .*max_new_tokens"):
        run_batch(tiny_gpt2_onnx, source, tmp_path / "out", other, device="cpu", progress=False)
    edited = write_jsonl(tmp_path / "edited.jsonl", [*prompts(3), {"id": 3, "text": "another prompt"}])
    with pytest.raises(ValueError, match="prompts_sha256"):
        run_batch(tiny_gpt2_onnx, edited, tmp_path / "out", BatchOptions(params=PARAMS), device="cpu", progress=False)
    summary = run_batch(tiny_gpt2_onnx, source, tmp_path / "out", other, device="cpu", overwrite=True, progress=False)
    assert summary.written_shards == 1 and len(read_output(tmp_path / "out")) == 4
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an onnxgen batch output"):
        run_batch(tiny_gpt2_onnx, source, tmp_path / "foreign", other, device="cpu", overwrite=True, progress=False)


@pytest.mark.parametrize(
    "lines, options, message",
    [
        (['{"text": "a"}', '{"prompt": "b"}'], {}, "row 1: column 'text' must be a non-empty string, got None"),
        (['{"text": "a"}', "not json"], {}, "line 2 is not valid JSON"),
        (['{"text": "a", "generated": 1}'], {}, "already has the output column 'generated'"),
        (['{"text": "a", "seed": 1.5}'], {"seed_column": "seed"}, "must hold integers >= 0 or null, got 1.5"),
        (['{"text": "a"}'], {"params": {"top_p": 3}}, "top_p must be a number in [0, 1], got 3"),
        (['{"text": "a"}'], {"params": {"temprature": 1}}, "did you mean 'temperature'"),
    ],
)
def test_bad_input_fails_before_generating(tiny_gpt2_onnx, tmp_path, lines, options, message):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises((ValueError, TypeError)) as info:
        run_batch(tiny_gpt2_onnx, source, tmp_path / "out", BatchOptions(**options), device="cpu", progress=False)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_parquet_in_and_out_with_a_list_column(tiny_t5_onnx, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"id": i, "text": f"summarize: text {i}", "note": None if i < 3 else "x"} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    options = BatchOptions(shard_size=3, params={**PARAMS, "num_generations": 2})
    summary = run_batch(tiny_t5_onnx, tmp_path / "in.parquet", tmp_path / "out", options, device="cpu", progress=False)
    assert [f.name for f in summary.files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(tmp_path / "out")  # one schema across shards, though the first has only null notes
    assert table.column_names == ["id", "text", "note", "generated"]
    generated = table.schema.field("generated").type
    assert pa.types.is_list(generated) and generated.value_type == pa.string()
    assert table.column("id").to_pylist() == list(range(7))
    tg = TextGeneration(tiny_t5_onnx, device="cpu")
    assert table.column("generated").to_pylist() == tg([r["text"] for r in rows], **options.params)


def test_the_ray_udf_adds_a_column_to_every_batch_format(tiny_gpt2_onnx, tg):
    """`TextGenerationUDF` itself needs no Ray: what each Ray Data batch format gets back."""
    np = pytest.importorskip("numpy")
    pa = pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    from onnxgen.ray.data import TextGenerationUDF

    udf = TextGenerationUDF(tiny_gpt2_onnx, device="cpu", column="prompt", num_generations=2, **PARAMS)
    texts = ["The café", "Prices rose", "Once upon"]
    expected = tg(texts, num_generations=2, **PARAMS)
    from_arrow = udf(pa.table({"prompt": texts}))
    assert from_arrow.column("generated").to_pylist() == expected
    assert udf(pd.DataFrame({"prompt": texts}))["generated"].tolist() == expected
    from_numpy = udf({"prompt": np.array(texts)})
    assert from_numpy["generated"].shape == (3,) and from_numpy["generated"].tolist() == expected
    with pytest.raises(ValueError, match="top_p"):
        TextGenerationUDF(tiny_gpt2_onnx, device="cpu", top_p=2.0)


def test_nothing_imports_ray_until_asked():
    code = ("import sys, onnxgen.batch, onnxgen.cli, onnxgen.ray, onnxgen.ray.data, onnxgen.ray.serve; "
            "onnxgen.cli._parser(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def onnxgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxgen.cli", *args], capture_output=True, text=True, check=False, timeout=300)


def test_the_cli_writes_and_resumes(tiny_gpt2_onnx, tg, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in ("The café", "Prices rose", "Once upon")])
    args = ["batch", str(tiny_gpt2_onnx), str(source), str(tmp_path / "out"), "--column", "prompt",
            "--output-column", "continuation", "--shard-size", "2", "--max-new-tokens", "5", "--seed", "3",
            "--return-full-text", "false", "--no-progress"]
    first, second = onnxgen(*args), onnxgen(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "2 written now, 0 by an earlier run" in first.stdout
    assert "0 written now, 2 by an earlier run" in second.stdout
    out = read_output(tmp_path / "out")
    expected = tg(["The café", "Prices rose", "Once upon"], max_new_tokens=5, seed=3, return_full_text=False)
    assert [r["continuation"] for r in out] == expected
    bad = onnxgen("batch", str(tiny_gpt2_onnx), str(source), str(tmp_path / "bad"), "--top-p", "1.5")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "top_p must be a number in [0, 1], got 1.5" in bad.stderr
