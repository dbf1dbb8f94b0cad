"""benchmarks/report.py's speed-ups: paired repeat by repeat, so that the machine's drift between repeats cancels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if not (BENCHMARKS / "report.py").exists():  # CI's runtime-only run copies tests/ without benchmarks/
    pytest.skip("benchmarks/ is not beside this test tree", allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))
import report  # noqa: E402


def _record(decode_ms: list[float], run_id: str = "run", new_tokens: int = 5) -> dict:
    t1 = [0.01 * (i + 1) for i in range(len(decode_ms))]
    tn = [a + d / 1000 * (new_tokens - 1) for a, d in zip(t1, decode_ms)]
    ordered = sorted(decode_ms)
    return {"t1_s": t1, "tn_s": tn, "new_tokens": new_tokens, "run_id": run_id,
            "decode_ms": ordered[len(ordered) // 2]}


def test_each_repeat_is_compared_with_the_same_repeat_of_the_baseline():
    # The machine slows down and speeds up; the peer is 10% slower than the baseline in every repeat.
    base = [10.0, 14.0, 8.0, 12.0, 9.0]
    peer = [1.1 * b for b in base]
    middle, low, high = report.paired_ratio(_record(peer), _record(base))
    assert middle == pytest.approx(1.1) and low == pytest.approx(1.1) and high == pytest.approx(1.1)
    # Pairs follow the repeats' order: the same times in another order are other pairs.
    shuffled = _record([14.0, 8.0, 10.0, 9.0, 12.0])
    middle, low, high = report.paired_ratio(_record(peer), shuffled)
    assert low < 1.0 < 1.1 < high


def test_the_quartiles_bracket_the_median():
    base = _record([10.0] * 8)
    peer = _record([9.0, 9.5, 10.0, 10.5, 11.0, 11.5, 12.0, 20.0])
    middle, low, high = report.paired_ratio(peer, base)
    assert low < middle < high and middle == pytest.approx(1.075) and high < 2.0
    assert report._speedup(peer, base) == f"{middle:.2f}× ({low:.2f}–{high:.2f})"


def test_records_of_different_runs_fall_back_to_the_ratio_of_medians():
    base, peer = _record([10.0, 10.0, 10.0], run_id="a"), _record([12.0, 12.0, 12.0], run_id="b")
    assert report.paired_ratio(peer, base) is None
    assert report._speedup(peer, base) == "1.20×"
    assert report._ratio(peer, base) == pytest.approx(1.2)
    assert report.paired_ratio({"decode_ms": 12.0}, base) is None  # a record written before per-repeat times


def test_versions_and_kernel_come_from_the_runs_not_from_the_report_writer():
    env = {"versions": {"python": "3.99", "onnxruntime": "9.9"}, "kernel": "writer-kernel"}
    shown = [{"packages": {"python": "3.11.7", "onnxruntime": "1.32.0"}, "kernel": "k1"},
             {"packages": {"python": "3.11.7", "onnxruntime": "1.31.0"}, "kernel": "k1"}]
    table, kernel = report._run_environment(shown, env)
    assert "| onnxruntime | 1.31.0, 1.32.0 |" in table and "| python | 3.11.7 |" in table
    assert "9.9" not in table and kernel == "k1"
    # Rows from before runs recorded their environment: the writer's, labelled as such.
    table, kernel = report._run_environment([{"engine": "onnxgen"}], env)
    assert "| onnxruntime | 9.9 |" in table and "predate" in table and kernel == "writer-kernel"
