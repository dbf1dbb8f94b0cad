"""On a local Ray instance this module starts (2 CPUs, no dashboard, usage stats off): Ray Data gives the in-process
run's rows, an interrupted Ray run resumes to exactly one row per input, and Ray Serve with two replicas answers
the official openai client exactly as `onnxgen serve` does. Every test runs under a deadline.

Ray binds its own services to this machine's address (it maps 127.0.0.1 to it); the Serve proxy listens on
127.0.0.1 only. Skipped when Ray is not installed (`pip install 'onnxgen[ray]'`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read when Ray starts: no usage report leaves the machine
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("ray.serve")
pytest.importorskip("pyarrow")
openai = pytest.importorskip("openai")

from onnxgen.batch import MANIFEST, BatchOptions, RayOptions, ShardedOutput, run_batch

TEST_DEADLINE = 90  # seconds per test; the whole module takes about a minute on 2 cores
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, on copying its context
PARAMS = {"max_new_tokens": 6, "do_sample": True, "top_k": 40, "seed": 5}


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    def expire(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    with deadline(120, "starting Ray"):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def each_test_has_a_deadline(request):
    with deadline(TEST_DEADLINE, request.node.name):
        yield


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_output(directory: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(directory.glob("part-*.jsonl")) for line in part.open()]


def prompts(n: int) -> list[dict]:
    words = ["The café", "Prices rose", "Once upon a time", "Das Mädchen", "I love pizza 🍕", "東京は"]
    return [{"id": i, "text": f"{words[i % len(words)]} {i}", "seed": None if i % 3 == 0 else i} for i in range(n)]


def test_ray_data_equals_the_in_process_run_row_for_row(ray_cluster, tiny_gpt2_onnx, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    options = BatchOptions(seed_column="seed", shard_size=50, batch_size=8, params={**PARAMS, "num_generations": 2})
    local = run_batch(tiny_gpt2_onnx, source, tmp_path / "local", options, device="cpu", progress=False)
    on_ray = run_batch(tiny_gpt2_onnx, source, tmp_path / "ray", replace(options, batch_size=5),
                       ray_options=RayOptions(num_actors=2), device="cpu", intra_op_threads=1, progress=False)
    assert (local.written_shards, on_ray.written_shards) == (6, 6)
    rows = read_output(tmp_path / "ray")
    assert rows == read_output(tmp_path / "local")
    assert [r["id"] for r in rows] == list(range(300)) and all(len(r["generated"]) == 2 for r in rows)


def test_an_interrupted_ray_run_resumes_to_one_row_per_input(ray_cluster, tiny_gpt2_onnx, tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", prompts(120))
    options = BatchOptions(shard_size=10, batch_size=5, params=PARAMS)
    on_ray = RayOptions(num_actors=2)
    real_write, written = ShardedOutput.write, []

    def write_then_stop(self, *args):
        real_write(self, *args)
        written.append(args[0])
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C with shards still in flight on the actors

    monkeypatch.setattr(ShardedOutput, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_batch(tiny_gpt2_onnx, source, tmp_path / "out", options, ray_options=on_ray, device="cpu", progress=False)
    monkeypatch.undo()
    finished = json.loads((tmp_path / "out" / MANIFEST).read_text())["finished"]
    assert sorted(finished) == sorted(f"part-{i:05d}.jsonl" for i in written)

    resumed = run_batch(tiny_gpt2_onnx, source, tmp_path / "out", options, ray_options=on_ray, device="cpu",
                        progress=False)
    assert (resumed.skipped_shards, resumed.written_shards) == (3, 9)
    rows = read_output(tmp_path / "out")
    assert [r["id"] for r in rows] == list(range(120))
    run_batch(tiny_gpt2_onnx, source, tmp_path / "local", options, device="cpu", progress=False)
    assert rows == read_output(tmp_path / "local")


def test_the_cli_joins_a_running_cluster(ray_cluster, tiny_t5_onnx, tmp_path):
    """`onnxgen batch --ray-address`, as against a multi-node cluster: a second driver process joins this one."""
    import subprocess
    import sys

    source = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    common = [str(tiny_t5_onnx), str(source), "--shard-size", "5", "--max-new-tokens", "4", "--seed-column", "seed",
              "--seed", "2", "--do-sample", "true", "--no-progress"]
    address = ray.get_runtime_context().gcs_address
    joined = subprocess.run([sys.executable, "-m", "onnxgen.cli", "batch", *common[:2], str(tmp_path / "ray"),
                             *common[2:], "--ray-address", address, "--device", "cpu"],
                            capture_output=True, text=True, check=False, timeout=TEST_DEADLINE - 10)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "12 rows in 3 shards" in joined.stdout
    assert ray.cluster_resources()["CPU"] == 2  # it joined this cluster and left it running
    run_batch(tiny_t5_onnx, source, tmp_path / "local", BatchOptions(shard_size=5, seed_column="seed", params={
        "max_new_tokens": 4, "seed": 2, "do_sample": True}), device="cpu", progress=False)
    assert read_output(tmp_path / "ray") == read_output(tmp_path / "local")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_serve_with_two_replicas_answers_the_openai_client(ray_cluster, tiny_gpt2_onnx):
    import httpx
    from onnxgen.ray.serve import serve_ray
    from ray import serve
    from server_helpers import ThreadServer

    port = free_port()
    try:
        serve_ray(tiny_gpt2_onnx, replicas=2, num_cpus=0.5, port=port, blocking=False, device="cpu",
                  model_name="tiny")
        assert serve.status().applications["onnxgen"].deployments["onnxgen"].replica_states == {"RUNNING": 2}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        request = {"model": "tiny", "prompt": ["The café", "Prices rose"], "max_tokens": 6, "seed": 7}
        answers = [client.completions.create(**request) for _ in range(4)]  # spread over both replicas
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="The café", max_tokens=6, seed=7, stream=True))
        backprop = httpx.post(f"http://127.0.0.1:{port}/text-generation", timeout=30,
                              json={"text": "Once upon", "max_new_tokens": 5, "seed": 3}).json()
    finally:
        serve.shutdown()
    with ThreadServer(tiny_gpt2_onnx) as plain:  # `onnxgen serve`: the same API, one process
        expected = plain.openai().completions.create(**request)
        expected_backprop = plain.http().post("/text-generation",
                                              json={"text": "Once upon", "max_new_tokens": 5, "seed": 3}).json()
    texts = [c.text for c in expected.choices]
    assert all([c.text for c in a.choices] == texts for a in answers) and answers[0].model == "tiny"
    assert streamed == texts[0] and backprop == expected_backprop
