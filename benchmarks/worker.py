"""One engine in a process of its own, driven by bench.py over stdin/stdout (one JSON object per line).

A fresh process per (engine, model, cell) makes import time and peak memory clean: the import is timed before
anything else loads, and the peak resident set (VmHWM) covers exactly this engine's import, load and runs.

    python worker.py '{"engine": "ctranslate2", "model": "gpt2", "model_dir": "...", "device": "cpu", "threads": 2,
                       "precision": "fp32"}'

Replies, in order: {"ready": true, "import_s", "load_s", "rss_mb", "versions", "settings"} or {"error": ...};
then one reply per command:
    {"cmd": "gen", "prompts": [[...]], "new_tokens": N, "mode": "greedy", "seed": 0}
        -> {"s": seconds, "ids": [[...]]}  or {"error": ...}   (ids: the new tokens, checked to be N per row)
    {"cmd": "stats"} -> {"peak_rss_mb", "rss_mb"}
    {"cmd": "quit"}
Only the standard library is imported before the engine, so that the engine's import time is its own.
"""

import json
import os
import sys
import time
import traceback


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if field == "VmHWM":
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    # Engines may print to stdout; keep the real stdout for replies and send everything else to stderr.
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        reply_stream.write(json.dumps(obj) + "\n")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engines import ENGINES  # standard library only

    engine = ENGINES[spec["engine"]]()
    engine.precision = spec.get("precision", "fp32")
    try:
        t0 = time.perf_counter()
        engine.import_modules()
        import_s = time.perf_counter() - t0
    except Exception as exc:  # ImportError / AttributeError: the engine is not installed or not written yet
        reply(dict(_error(exc), stage="import"))
        return
    try:
        t0 = time.perf_counter()
        engine.load(spec["model_dir"], spec["family"], spec["device"], spec["threads"])
        load_s = time.perf_counter() - t0
        reply({"ready": True, "import_s": import_s, "load_s": load_s, "rss_mb": _status_mb("VmRSS"),
               "versions": engine.versions(), "settings": engine.settings()})
    except Exception as exc:
        reply(dict(_error(exc), stage="load"))
        return

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "stats":
            reply({"peak_rss_mb": _status_mb("VmHWM"), "rss_mb": _status_mb("VmRSS")})
            continue
        try:
            n = cmd["new_tokens"]
            t0 = time.perf_counter()
            ids = engine.generate(cmd["prompts"], n, cmd["mode"], cmd["seed"])
            s = time.perf_counter() - t0
            lengths = sorted({len(row) for row in ids})
            if len(ids) != len(cmd["prompts"]) or lengths != [n]:
                reply({"error": f"expected {len(cmd['prompts'])} rows of {n} new tokens, got {len(ids)} rows "
                                f"of lengths {lengths}"})
                continue
            reply({"s": s, "ids": ids})
        except Exception as exc:
            reply(_error(exc))


if __name__ == "__main__":
    main()
