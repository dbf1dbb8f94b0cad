"""Time onnxgen against its peers, side by side, on the same random-weight model of a real config.

For every cell (model × mode × batch) each engine runs in a process of its own (worker.py); the processes are
started one after another, warmed up, and then timed in turns: in each repeat every engine generates 1 token and
then N tokens from the same prompt, the engines' order rotating from one repeat to the next. Reported per engine:

    prompt ms        median time to generate 1 token (the prompt's forward pass plus one step)
    decode ms/token  median of (T(N) - T(1)) / (N - 1): one decoding step for the whole batch
    tokens/s         batch × N / median T(N)
    peak RSS MB      the worker's peak resident memory (import + load + this cell's runs)
    import s, load s the engine's import and model load, timed in the fresh worker

Results are appended to a JSONL file as each cell finishes; a rerun skips the cells already there (same device,
model, engine, mode, batch, token counts, threads and repeats) unless --force.

    python benchmarks/bench.py                                   # the whole matrix: 4 models × 3 modes × 2 batches
    python benchmarks/bench.py --models gpt2 --modes greedy --batch 1 --new-tokens 8 --repeats 1   # a smoke run
    python benchmarks/bench.py --report-only --write-md benchmarks/RESULTS.md   # tables from the cache alone
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402  (standard library only at import)
import report  # noqa: E402
from report import cell_key  # noqa: E402
from engines import ENGINES, MODES  # noqa: E402

ENGINE_ORDER = list(ENGINES)  # onnxgen first
REPLY_TIMEOUT_S = 1800  # a worker silent this long is taken as hung and killed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(models.MODELS), choices=list(models.MODELS))
    p.add_argument("--engines", nargs="+", default=ENGINE_ORDER, choices=ENGINE_ORDER)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64, help="N new tokens per sequence (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine; the median is reported")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16", "fp32opt"],
                   help="weights of every engine in this run (default fp32); engines without it are listed as such")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="intra-op threads for every engine (default: all %(default)s cores)")
    p.add_argument("--cooldown", type=float, default=0.5,
                   help="seconds of idle between two engines' turns, so that one engine's spinning OpenMP threads "
                        "do not steal the cores from the next (default %(default)s)")
    p.add_argument("--wait-idle", type=float, default=300,
                   help="before each cell, wait up to this many seconds for other processes to leave the CPU "
                        "idle (0: don't wait; default %(default)s)")
    p.add_argument("--max-others", type=float, default=0.15,
                   help="share of the CPU other processes may use while a cell is timed (default %(default)s)")
    p.add_argument("--retry-busy", type=int, default=2,
                   help="times to rerun a cell timed while others used more than --max-others (default 2)")
    p.add_argument("--results", type=Path, default=HERE / "results.jsonl", help="JSONL cache of finished cells")
    p.add_argument("--baseline", default="onnxgen", choices=ENGINE_ORDER,
                   help="engine the ratio columns compare against (default onnxgen)")
    p.add_argument("--force", action="store_true", help="rerun cells already in the results file")
    p.add_argument("--report-only", action="store_true", help="print the tables from the results file, run nothing")
    p.add_argument("--write-md", type=Path, help="also write the report (tables, hardware, versions) here")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2 (decode time is T(N) - T(1)), got {args.new_tokens}")
    if args.prompt_tokens < 1 or args.repeats < 1 or min(args.batch) < 1:
        p.error("--prompt-tokens, --repeats and --batch must be positive")
    return args


# ---------------------------------------------------------------------------------------------- cache

def load_results(path: Path) -> dict[tuple, dict]:
    """Finished cells of the JSONL file, the last record of a key winning."""
    done = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    done[cell_key(rec)] = rec
    return done


def append_result(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------------------------- inputs

def make_prompts(model: str, batch: int, length: int) -> list[list[int]]:
    """`batch` fixed prompts of random ids (row 0 the same for every batch size), specials excluded."""
    lo, hi = (0, 50256) if models.family(model) == "gpt2" else (3, 32000)
    rows = []
    for r in range(batch):
        rng = random.Random(1000 + r)
        rows.append([rng.randrange(lo, hi) for _ in range(length)])
    return rows


_BUILD_FAILURES: dict[tuple, str] = {}  # tried once per run


def ensure_artifact(model: str, artifact: str, log_dir: Path) -> str | None:
    """Build the artifact in a subprocess (keeps torch out of the driver); None when built, else why not."""
    if models.is_built(model, artifact):
        return None
    if (model, artifact) in _BUILD_FAILURES:
        return _BUILD_FAILURES[model, artifact]
    log = log_dir / f"build-{model}-{artifact}.log"
    print(f"[build] {model}/{artifact} (log: {log})", flush=True)
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(HERE / "models.py"), "--models", model, "--artifacts", artifact],
                       stdout=f, stderr=subprocess.STDOUT, env=worker_env(os.cpu_count()))
    if models.is_built(model, artifact):
        return None
    _BUILD_FAILURES[model, artifact] = "build failed: " + _last_line(log)
    return _BUILD_FAILURES[model, artifact]


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


# ---------------------------------------------------------------------------------------------- workers

class Worker:
    """One engine process; `ask` sends a command and waits for its reply."""

    def __init__(self, engine: str, model: str, args, log_path: Path):
        artifact = ENGINES[engine].artifact_for(args.precision)
        spec = dict(engine=engine, model=model, family=models.family(model), device=args.device,
                    threads=args.threads, precision=args.precision, model_dir=str(models.path(model, artifact)))
        self.engine, self.log_path = engine, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=worker_env(args.threads))
        self.hello = self._read()

    def _read(self) -> dict:
        if not select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)[0]:
            self.proc.kill()
            return {"error": f"no reply within {REPLY_TIMEOUT_S} s: killed"}
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return {"error": f"worker exited ({self.proc.returncode}): {_last_line(self.log_path)}"}
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def run_cell(model: str, mode: str, batch: int, engines: list[str], args, log_dir: Path) -> dict[str, dict]:
    """Time `engines` on one cell, interleaved; returns engine -> record (or {"error": ...})."""
    prompts = make_prompts(model, batch, args.prompt_tokens)
    n = args.new_tokens
    out: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    try:
        for e in engines:  # started one at a time so that loads do not compete for the cores
            w = Worker(e, model, args, log_dir / f"{model}-{mode}-b{batch}-{e}.log")
            if "error" in w.hello:
                out[e] = {"error": f"{w.hello.get('stage', 'start')}: {w.hello['error']}"}
                w.close()
                continue
            warm = [w.ask(cmd="gen", prompts=prompts, new_tokens=k, mode=mode, seed=0) for k in (n, 1)]
            bad = next((r for r in warm if "error" in r), None)
            if bad:
                out[e] = {"error": f"warm-up: {bad['error']}"}
                w.close()
                continue
            workers[e] = w
        times = {e: {"t1": [], "tn": []} for e in workers}
        ids = {}
        cpu0 = cpu_snapshot([w.proc.pid for w in workers.values()])
        for r in range(args.repeats):
            order = list(workers)
            order = order[r % len(order):] + order[:r % len(order)] if order else order
            for e in order:
                if e in out:
                    continue
                time.sleep(args.cooldown)
                r1 = workers[e].ask(cmd="gen", prompts=prompts, new_tokens=1, mode=mode, seed=r)
                rn = workers[e].ask(cmd="gen", prompts=prompts, new_tokens=n, mode=mode, seed=r)
                if "error" in r1 or "error" in rn:
                    out[e] = {"error": (r1.get("error") or rn.get("error"))}
                    continue
                times[e]["t1"].append(r1["s"])
                times[e]["tn"].append(rn["s"])
                ids[e] = rn["ids"]
        others = others_cpu(cpu0, cpu_snapshot([w.proc.pid for w in workers.values()]))
        if others is not None and others > args.max_others:
            print(f"  warning: other processes used {100 * others:.0f}% of the CPU while timing", flush=True)
        for e, w in workers.items():
            if e not in out:
                out[e] = summarise(times[e], batch, n, w.hello, w.ask(cmd="stats"), ids[e])
                out[e]["others_cpu"] = others
    finally:
        for w in workers.values():
            w.close()
    return out


def run_cell_quietly(model, mode, batch, engines, args, log_dir) -> dict[str, dict]:
    """run_cell on an idle machine: wait for idle, and rerun (up to --retry-busy times) a cell during which other
    processes took more than --max-others of the CPU; the attempt with the least foreign load is kept."""
    best, best_busy = None, None
    for attempt in range(args.retry_busy + 1):
        wait_idle(args.wait_idle, args.max_others)
        res = run_cell(model, mode, batch, engines, args, log_dir)
        busy = max([r.get("others_cpu") or 0.0 for r in res.values() if "error" not in r], default=0.0)
        if best is None or busy < best_busy:
            best, best_busy = res, busy
        if busy <= args.max_others:
            break
        if attempt < args.retry_busy:
            print(f"  others used {100 * busy:.0f}% of the CPU: timing the cell again", flush=True)
    return best


def cpu_snapshot(pids: list[int]) -> tuple[int, int, int] | None:
    """(busy jiffies of the machine, all jiffies, jiffies used by `pids` and this process); None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        ours = 0
        for pid in pids + [os.getpid()]:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    except (OSError, ValueError, IndexError):
        return None
    return sum(vals) - vals[3] - vals[4], sum(vals), ours


def others_cpu(a, b) -> float | None:
    """Share of the machine's CPU that processes other than ours used between two snapshots."""
    if a is None or b is None or b[1] == a[1]:
        return None
    return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1]))


def wait_idle(max_s: float, threshold: float) -> float | None:
    """Wait (at most max_s) until the machine is idle: others' CPU share over 2 s below `threshold`."""
    if max_s <= 0:
        return None
    t_start, told = time.monotonic(), False
    while True:
        a = cpu_snapshot([])
        time.sleep(2)
        busy = others_cpu(a, cpu_snapshot([]))
        waited = time.monotonic() - t_start
        if busy is None or busy < threshold:
            if told:
                print(f"  (idle after {waited:.0f} s: {100 * busy:.0f}% busy)", flush=True)
            return busy
        if waited > max_s:
            print(f"  (still {100 * busy:.0f}% busy after {waited:.0f} s: timing anyway)", flush=True)
            return busy
        if not told:
            print(f"  waiting up to {max_s:.0f} s for the machine to go idle ({100 * busy:.0f}% busy)", flush=True)
            told = True


def summarise(t: dict, batch: int, n: int, hello: dict, stats: dict, ids: list) -> dict:
    decode = [(tn - t1) / (n - 1) for t1, tn in zip(t["t1"], t["tn"])]
    return {
        "prompt_ms": 1000 * statistics.median(t["t1"]),
        "decode_ms": 1000 * statistics.median(decode),
        "tokens_per_s": batch * n / statistics.median(t["tn"]),
        "peak_rss_mb": stats.get("peak_rss_mb"),
        "import_s": hello["import_s"],
        "load_s": hello["load_s"],
        "t1_s": t["t1"], "tn_s": t["tn"],
        "versions": hello.get("versions", {}), "settings": hello.get("settings", {}),
        "ids": ids,
    }


# ---------------------------------------------------------------------------------------------- driver

def run_all(args, env: dict, done: dict, notes: dict) -> None:
    """Run every requested cell not yet in `done`, appending each finished engine's record to the results file."""
    log_dir = models.CACHE_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    base = dict(device=args.device, precision=args.precision, prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, threads=args.threads, repeats=args.repeats)
    for model in args.models:
        for mode in args.modes:
            for batch in args.batch:
                todo = []
                for e in args.engines:
                    key = cell_key(dict(base, model=model, engine=e, mode=mode, batch=batch))
                    why = ENGINES[e]().unsupported(models.family(model), mode, args.device, args.precision)
                    if why is None and (key not in done or args.force):
                        why = ensure_artifact(model, ENGINES[e].artifact_for(args.precision), log_dir)
                        if why is None:
                            todo.append(e)
                            continue
                        why = f"unavailable ({why})"
                    if why:
                        notes[key] = why  # shown in the table, not cached: a rerun tries again
                if not todo:
                    continue
                print(f"[run] {model} {mode} batch {batch}: {', '.join(todo)}", flush=True)
                t0 = time.perf_counter()
                for e, res in run_cell_quietly(model, mode, batch, todo, args, log_dir).items():
                    rec = dict(base, model=model, engine=e, mode=mode, batch=batch)
                    if "error" in res:
                        notes[cell_key(rec)] = f"unavailable ({res['error']})"
                        print(f"  {e}: {res['error']}", flush=True)
                        continue
                    rec.update(res, when=time.strftime("%Y-%m-%d %H:%M:%S"), run_id=env["run_id"],
                               command=env["command"], hardware=env["hardware"],
                               kernel=env["kernel"], packages=env["versions"],
                               artifact=models.fingerprint(ENGINES[e].artifact_for(args.precision)))
                    append_result(args.results, rec)
                    done[cell_key(rec)] = rec
                    print(f"  {e}: prompt {res['prompt_ms']:.1f} ms, decode {res['decode_ms']:.2f} ms/token, "
                          f"peak {res['peak_rss_mb'] or 0:.0f} MB", flush=True)
                print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    env = report.environment(args.device)
    env["run_id"] = time.strftime("%Y%m%dT%H%M%S")  # rows of one invocation were timed interleaved
    env["command"] = report.command_line()
    done = load_results(args.results)
    notes: dict[tuple, str] = {}
    print(report.header(env, args), flush=True)
    if not args.report_only:
        run_all(args, env, done, notes)
    text = report.render(done, notes, args, env)
    print(text)
    if args.write_md:
        report.write_section(args.write_md, report.markdown_document(text, args, env, done), args)
        print(f"wrote {args.write_md}")


if __name__ == "__main__":
    main()
