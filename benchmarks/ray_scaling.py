"""Ray scaling on this machine: 1 vs 2 Ray Data actors and 1 vs 2 Ray Serve replicas, onnxruntime pinned.

    python benchmarks/ray_scaling.py                       # GPT-2 (124M config, random weights) from benchmarks/.cache
    python benchmarks/ray_scaling.py --prompts 128 --new-tokens 32 --write-md benchmarks/RESULTS.md

Batch: `onnxgen.batch.run_batch` over PROMPTS fixed prompts (PROMPT_WORDS words each; exactly NEW_TOKENS sampled
tokens per prompt, seeded), in this process with 1 and with 2 onnxruntime threads, then on Ray with 1 and 2 actors
of 1 CPU and 1 thread each. Serve: `onnxgen.ray.serve_ray` with 1 and 2 replicas of 1 CPU and 1 thread each,
CLIENTS concurrent clients (threads of this process) sending REQUESTS completions of exactly NEW_TOKENS tokens.
Ray starts once (num_cpus = the machine's cores) and its own start-up is not timed; actors' start-up (model load)
is, and is also shown on its own. Prints one markdown table; `--write-md` puts it in the file's "## Ray" section.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Before NumPy loads: one BLAS/OpenMP thread here too, as Ray gives its 1-CPU workers; onnxruntime's own pool
# still gets the intra_op_threads each run asks for.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

DEFAULT_MODEL = Path(__file__).resolve().parent / ".cache" / "gpt2" / "onnxgen"
SECTION = "## Ray"


# -- load from other processes (this machine has 2 cores and is shared) ------------------------------------------
def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    ours, grew = {root}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= new
        grew = bool(new)
    return ours


def cpu_snapshot() -> tuple[int, int, int]:
    """(busy ticks of the machine, all ticks, ticks of this process and its descendants: Ray's too)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    ours = 0
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass  # exited meanwhile
    return sum(vals) - vals[3] - vals[4], sum(vals), ours


def others_share(a, b) -> float:
    """Share of the machine's CPU time that processes other than ours used between two snapshots."""
    return max(0.0, (b[0] - a[0]) - (b[2] - a[2])) / max(1, b[1] - a[1])


def wait_idle(max_s: float, threshold: float = 0.1) -> None:
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        a = cpu_snapshot()
        time.sleep(2)
        if others_share(a, cpu_snapshot()) < threshold:
            return
    print(f"# the machine stayed busy for {max_s:.0f} s: measuring anyway", file=sys.stderr)


# -- batch -------------------------------------------------------------------------------------------------------
def make_prompts(n: int, words: int) -> list[dict]:
    rng = random.Random(0)
    return [{"id": i, "text": " ".join(f"t{rng.randrange(100, 50000)}" for _ in range(words))} for i in range(n)]


def time_batch(args, source: Path, ray_options, threads: int) -> dict:
    from onnxgen.batch import BatchOptions, run_batch

    params = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": True, "seed": 1}
    options = BatchOptions(shard_size=args.prompts, batch_size=args.batch_size, params=params)
    arrivals = []
    with tempfile.TemporaryDirectory() as out:
        wait_idle(args.wait_idle)
        before, started = cpu_snapshot(), time.perf_counter()
        import onnxgen.batch as batch_module

        progress = batch_module._Progress.update
        batch_module._Progress.update = lambda self, rows: (arrivals.append((time.perf_counter(), rows)),
                                                            progress(self, rows))
        try:
            run_batch(args.model_dir, source, out, options, ray_options=ray_options, device="cpu",
                      intra_op_threads=threads, progress=False)
        finally:
            batch_module._Progress.update = progress
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(out) / "part-00000.jsonl").open()]
    (first, first_rows), (last, _) = arrivals[0], arrivals[-1]
    steady = (len(rows) - first_rows) * args.new_tokens / (last - first) if last > first else None
    return {"seconds": seconds, "first_rows_s": first - started, "rows": len(rows), "steady_tokens_s": steady,
            "others": others_share(before, cpu_snapshot())}


# -- serve -------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_serve(args, replicas: int) -> dict:
    import httpx
    from onnxgen.ray.serve import serve_ray
    from ray import serve

    port = _free_port()
    serve_ray(args.model_dir, replicas=replicas, num_cpus=1, port=port, blocking=False, device="cpu",
              intra_op_threads=1, model_name="bench")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 50000) for _ in range(args.prompt_words)] for _ in range(args.clients)]
    body = {"model": "bench", "max_tokens": args.new_tokens, "min_tokens": args.new_tokens, "seed": 1}
    url = f"http://127.0.0.1:{port}/v1/completions"

    def client(prompt) -> list[float]:
        latencies = []
        with httpx.Client(timeout=600) as http:
            for _ in range(args.requests):
                t = time.perf_counter()
                reply = http.post(url, json={**body, "prompt": [prompt]})
                reply.raise_for_status()
                assert reply.json()["usage"]["completion_tokens"] == args.new_tokens, reply.text
                latencies.append(time.perf_counter() - t)
        return latencies

    try:
        for prompt in prompts[: 2 * replicas]:  # warm every replica
            httpx.post(url, json={**body, "prompt": [prompt], "max_tokens": 2, "min_tokens": 2}, timeout=600)
        wait_idle(args.wait_idle)
        before, started = cpu_snapshot(), time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            latencies = [s for per_client in pool.map(client, prompts) for s in per_client]
        seconds = time.perf_counter() - started
        others = others_share(before, cpu_snapshot())
    finally:
        serve.shutdown()  # the next run's port: Serve keeps the HTTP options it started with
    return {"seconds": seconds, "requests": len(latencies), "p50": statistics.median(latencies), "others": others}


# -- report ------------------------------------------------------------------------------------------------------
def table(batch: dict, serve_rows: dict, args) -> str:
    """Batch: tokens/s over the whole run (model loads included) and after the first batch came back (steady);
    serve: tokens/s while the load ran (after warm-up). × = steady (serve: overall) rate ÷ that of the same kind's
    one-worker row (in process: 1 thread; Ray Data: 1 actor; Ray Serve: 1 replica)."""
    tokens = args.prompts * args.new_tokens
    lines = ["| run | what | wall s | tokens/s overall | first rows after s | tokens/s steady | × | others' CPU % |",
             "|---|---|---|---|---|---|---|---|"]
    bases: dict[str, float] = {}
    for name, r in batch.items():
        steady = r["steady_tokens_s"]
        base = bases.setdefault(name.split(",")[0], steady)
        lines.append(f"| batch | {name} | {r['seconds']:.1f} | {tokens / r['seconds']:.0f} | {r['first_rows_s']:.1f} | "
                     f"{steady:.0f} | {steady / base:.2f} | {100 * r['others']:.0f} |")
    for name, r in serve_rows.items():
        rate = r["requests"] * args.new_tokens / r["seconds"]
        base = bases.setdefault("serve", rate)
        lines.append(f"| serve | {name} | {r['seconds']:.1f} | {rate:.0f} | p50 latency {r['p50']:.2f} | – | "
                     f"{rate / base:.2f} | {100 * r['others']:.0f} |")
    return "\n".join(lines)


def reading(batch: dict, serve_rows: dict, args) -> str:
    """The run's main ratios in a sentence, from the numbers themselves."""
    steady = {name.split(",")[0] + name.split(",")[1][:2]: r["steady_tokens_s"] for name, r in batch.items()}
    parts = []
    if {"Ray Data 1", "Ray Data 2", "in process 2"} <= steady.keys():
        parts.append(f"two 1-thread actors generate {steady['Ray Data 2'] / steady['Ray Data 1']:.2f}× as fast as one "
                     f"(steady), and {steady['Ray Data 2'] / steady['in process 2']:.2f}× as fast as one process "
                     "given both cores as onnxruntime threads: on CPU, splitting the cores between model copies "
                     "beats giving one copy more threads")
    rates = [r["requests"] * args.new_tokens / r["seconds"] for r in serve_rows.values()]
    if len(rates) == 2:
        parts.append(f"two replicas serve {rates[1] / rates[0]:.2f}× the tokens/s of one under {args.clients} "
                     "concurrent clients, which share the two cores with the replicas and Ray's proxy")
    return ("In this run " + "; ".join(parts) + ".") if parts else ""


def environment() -> str:
    import onnxruntime
    import ray

    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                   platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}; Python {platform.python_version()}, "
            f"ray {ray.__version__}, onnxruntime {onnxruntime.__version__}")


NOTES = """\
What is measured: `run_batch` over the same seeded prompts (every run writes the same rows), in this process and
on Ray Data actors of 1 CPU and 1 onnxruntime thread each, so two actors use the two cores without
oversubscribing them; and Ray Serve replicas of 1 CPU and 1 thread behind Ray's HTTP proxy, under concurrent
clients. "tokens/s overall" includes each actor's start (process, imports, model load: see "first rows after");
"tokens/s steady" counts only what came back after the first batch, the rate a long run approaches. "×" compares
each row's steady (serve: overall) rate to its kind's one-worker row. "others' CPU %" is the share of the
machine other processes took meanwhile (this machine is shared): rows with more than a few % are noisy.

How it extends to more nodes. Actors and replicas share nothing: each holds its own model copy and works on
whole batches; per batch only the prompts go out and the generated text comes back (kilobytes against seconds of
compute), so throughput is the sum of the workers' rates. One 1-thread worker per core is the unit the table
measures; a cluster of N nodes with C free cores each runs `--num-actors N*C --num-cpus 1` (Serve:
`--replicas N*C --num-cpus 1`) and should approach N*C times the 1-worker steady rate, less the tail of a batch
run (the last batches run on fewer actors than started; about one Ray block per batch keeps it short) and each
worker's start-up (a constant per worker, paid once per run). Memory bounds it first: every worker holds the
model (GPT-2 fp32: about 0.5 GB of weights), so on large models use fewer workers with more threads each
(`--num-cpus 4` gives each actor 4 onnxruntime threads), or one per GPU (`--num-gpus 1 --device cuda`). The
driver of `onnxgen batch --ray` joins rows and writes the shards itself, which costs far less per row than
generating it; past that, use `onnxgen.ray.map_text_generation` and Ray Data's own `write_parquet` so that writing
is spread over the cluster too. For Serve, Ray runs an HTTP proxy on every node with a replica and its router
keeps at most `max_batch_rows` requests on each replica, sending the rest to the least busy one: each added
replica adds one continuous-batching engine; the proxy adds a hop of a few milliseconds per request.
"""


def write_section(path: Path, text: str) -> None:
    """Put `text` in place of the file's SECTION (up to the next "## " heading), or append it."""
    old = path.read_text() if path.exists() else ""
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        rest = "" if end < 0 else old[end + 1 :]
        new = old[:start] + text + ("\n" + rest if rest else "")
    path.write_text(new)


def least_busy(args, measure) -> dict:
    """Run `measure()`; while others took more than --max-others of the machine, run it again (up to
    --retry-busy times) and keep the quietest run."""
    runs = [measure()]
    while runs[-1]["others"] > args.max_others and len(runs) <= args.retry_busy:
        print(f"# others took {100 * runs[-1]['others']:.0f}% of the CPU: measuring again", file=sys.stderr)
        runs.append(measure())
    return min(runs, key=lambda r: r["others"])


def measure_all(args) -> tuple[dict, dict]:
    import ray
    from onnxgen.batch import RayOptions

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "prompts.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(args.prompts, args.prompt_words)))
        batch = {}
        for n in (1, 2):
            batch[f"in process, {n} thread{'s' * (n > 1)}"] = least_busy(
                args, lambda n=n: time_batch(args, source, None, n))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            for n in (1, 2):
                on_ray = RayOptions(num_actors=n, num_cpus=1)
                batch[f"Ray Data, {n} actor{'s' * (n > 1)} × 1 thread"] = least_busy(
                    args, lambda on_ray=on_ray: time_batch(args, source, on_ray, 1))
            serve_rows = {} if args.skip_serve else {
                f"Ray Serve, {n} replica{'s' * (n > 1)} × 1 thread": least_busy(args, lambda n=n: time_serve(args, n))
                for n in (1, 2)}
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    return batch, serve_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--prompts", type=int, default=384)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (in process and per actor call)")
    p.add_argument("--clients", type=int, default=32, help="concurrent serve clients")
    p.add_argument("--requests", type=int, default=2, help="requests per serve client")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--wait-idle", type=float, default=120, help="seconds to wait for the machine to go idle")
    p.add_argument("--max-others", type=float, default=0.1, help="share of the CPU others may take during a run")
    p.add_argument("--retry-busy", type=int, default=2, help="times a run on a busier machine is repeated")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    p.add_argument("--from-json", type=Path, default=None, help="measure nothing: report a --json file's numbers")
    p.add_argument("--write-md", type=Path, default=None, help="put the table in this file's '## Ray' section")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        batch, serve_rows, env, command = saved["batch"], saved["serve"], saved["environment"], saved["command"]
        args = argparse.Namespace(**{**vars(args), **saved["args"], "write_md": args.write_md, "json": None})
    else:
        if not (args.model_dir / "onnxgen.json").exists():
            p.error(f"{args.model_dir} is no onnxgen export; build it with benchmarks/models.py --artifacts onnxgen")
        batch, serve_rows = measure_all(args)
        env = environment()
        command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    text = table(batch, serve_rows, args)
    print(f"{text}\n\n{env}\n{command}")
    if args.json:
        saved = {"batch": batch, "serve": serve_rows, "args": vars(args), "environment": env, "command": command}
        args.json.write_text(json.dumps(saved, default=str, indent=1))
    if args.write_md:
        write_section(args.write_md, f"{SECTION}\n\nProduced by `benchmarks/ray_scaling.py` on {env}.\n\n"
                      f"```\n{command}\n```\n\n{text}\n\n{reading(batch, serve_rows, args)}\n\n{NOTES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
