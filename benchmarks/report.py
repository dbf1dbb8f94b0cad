"""Hardware, versions and the markdown tables of bench.py (standard library only)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shlex
import statistics
import subprocess
import sys

from engines import ENGINES, MODES
from models import family

PACKAGES = ["onnxgen", "torch", "transformers", "optimum", "optimum-onnx", "accelerate", "onnx", "onnxruntime",
            "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "ctranslate2", "numpy"]
ENGINE_ORDER = list(ENGINES)
# Section titles where the precision's name alone would not say what ran.
PRECISION_TITLES = {
    "fp32opt": "fp32 weights, the peers' graphs through onnxruntime's transformer optimizer",
}
KEY_FIELDS = ("device", "model", "engine", "precision", "mode", "batch", "prompt_tokens", "new_tokens", "threads",
              "repeats")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str) -> dict:
    """What the numbers were measured on: CPU model and cores, memory, GPU, package versions, git commit."""
    lscpu = dict(line.split(":", 1) for line in _run(["lscpu"]).splitlines() if ":" in line)
    lscpu = {k.strip(): v.strip() for k, v in lscpu.items()}
    cpu = lscpu.get("Model name", platform.processor() or "unknown CPU")
    cores = int(lscpu.get("Core(s) per socket", 0) or 0) * int(lscpu.get("Socket(s)", 1) or 1)
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20)
    except OSError:
        pass
    hardware = f"{cpu}, {cores or os.cpu_count()} cores ({os.cpu_count()} logical), {mem_gib} GiB"
    gpu = None
    if device == "cuda":
        gpu = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]).strip()
        hardware += f"; GPU: {gpu or 'unknown'}"
    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    commit = _run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"]).strip()
    return {"hardware": hardware, "cpu": cpu, "cores": cores, "gpu": gpu, "versions": versions,
            "commit": commit or "(no commit)", "kernel": platform.release()}


def header(env: dict, args) -> str:
    return "\n".join([
        f"hardware: {env['hardware']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"device {args.device}, {args.threads} intra-op threads for every engine, prompt {args.prompt_tokens} "
        f"tokens, {args.new_tokens} new tokens, median of {args.repeats} interleaved runs, onnxgen commit "
        f"{env['commit']}",
    ])


def _fmt(x, digits=1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _agreement(ids: list, ref: list | None) -> str:
    """How many sequences equal the reference's, and the first differing step of the first that does not."""
    if ref is None or ids is None:
        return "—"
    same = sum(a == b for a, b in zip(ids, ref))
    text = f"{same}/{len(ref)}"
    for a, b in zip(ids, ref):
        if a != b:
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"{text} (diverges at step {step})"
    return text


def _cells(args):
    for model in args.models:
        for mode in args.modes:
            for batch in args.batch:
                yield model, mode, batch


def cell_key(rec: dict) -> tuple:
    """What makes two records the same measurement (the results file keeps the last one per key)."""
    return tuple(rec[f] for f in KEY_FIELDS)


def decode_times(rec: dict) -> list[float] | None:
    """The record's decode ms/token of each repeat, in order, or None for a record without them."""
    t1, tn, n = rec.get("t1_s"), rec.get("tn_s"), rec.get("new_tokens")
    if not t1 or not tn or len(t1) != len(tn) or not n or n < 2:
        return None
    return [1000 * (b - a) / (n - 1) for a, b in zip(t1, tn)]


def paired_ratio(rec: dict, base: dict) -> tuple[float, float, float] | None:
    """rec's decode time over base's, repeat by repeat: (median, lower quartile, upper quartile) of the ratios.

    The engines of a cell run in turns, so repeat r of each engine ran within seconds of the others'; on a
    shared machine whose speed swings by +-20% from one second to the next (measured here), the ratio of two
    runs made side by side is steadier than the ratio of two medians taken over a minute. None when the two
    records are not from the same interleaved run (or carry no per-repeat times): the caller falls back to the
    ratio of medians.
    """
    mine, theirs = decode_times(rec), decode_times(base)
    if mine is None or theirs is None or len(mine) != len(theirs) or rec.get("run_id") != base.get("run_id"):
        return None
    ratios = [a / b for a, b in zip(mine, theirs) if b > 0]
    if not ratios:
        return None
    if len(ratios) < 4:  # too few for quartiles: the range
        return statistics.median(ratios), min(ratios), max(ratios)
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), low, high


def _ratio(rec: dict, base: dict) -> float:
    """rec's decode time over base's: the median paired ratio where the records allow it, else of the medians."""
    paired = paired_ratio(rec, base)
    return paired[0] if paired else rec["decode_ms"] / base["decode_ms"]


def render(done: dict, notes: dict, args, env: dict) -> str:
    """Two markdown tables: every engine's numbers per cell, then decode ms/token side by side with ratios."""
    base = dict(device=args.device, precision=args.precision, prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, threads=args.threads, repeats=args.repeats)
    engines = [e for e in ENGINE_ORDER if e in args.engines]
    rows = []  # (model, mode, batch, {engine: record or note string})
    for model, mode, batch in _cells(args):
        found = {}
        for e in ENGINE_ORDER:  # transformers is the ids reference even when not displayed
            key = cell_key(dict(base, model=model, engine=e, mode=mode, batch=batch))
            if key in done:
                found[e] = done[key]
            elif key in notes and e in engines:
                found[e] = notes[key]
            elif e in engines and ENGINES[e]().unsupported(family(model), mode, args.device, args.precision):
                found[e] = ENGINES[e]().unsupported(family(model), mode, args.device, args.precision)
        ran = any(cell_key(dict(base, model=model, engine=e, mode=mode, batch=batch)) in notes for e in engines)
        if ran or any(isinstance(r, dict) for r in found.values()):  # skip cells that were never asked for
            rows.append((model, mode, batch, found))
    return "\n".join(_detail_table(rows, engines, args.baseline) + [""]
                     + _side_table(rows, engines, args.baseline))


def _detail_table(rows, engines, bl) -> list[str]:
    lines = [f"#### Every engine (ms; ratios: engine time / {bl} time, > 1 means {bl} is faster)", "",
             "| model | mode | batch | engine | prompt ms | decode ms/token | tokens/s | peak RSS MB | import s "
             f"| load s | prompt ÷ {bl} | decode ÷ {bl} | same ids as transformers | others' CPU % |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for model, mode, batch, found in rows:
        ref, blr = found.get("transformers"), found.get(bl)
        ref = ref if isinstance(ref, dict) else None
        blr = blr if isinstance(blr, dict) else None
        for e in engines:
            rec = found.get(e)
            if rec is None:
                continue
            if isinstance(rec, str):
                note = " ".join(rec.replace("|", "/").split())[:300]
                lines.append(f"| {model} | {mode} | {batch} | {e} | {note} ||||||||||")
                continue
            ratio_p = rec["prompt_ms"] / blr["prompt_ms"] if blr else None
            ratio_d = _ratio(rec, blr) if blr else None
            others = _fmt(100 * rec["others_cpu"], 0) if rec.get("others_cpu") is not None else "—"
            agree = "n/a (sampling)" if MODES[mode][0] else _agreement(rec.get("ids"), (ref or {}).get("ids"))
            lines.append(
                f"| {model} | {mode} | {batch} | {e} | {_fmt(rec['prompt_ms'])} | {_fmt(rec['decode_ms'], 2)} | "
                f"{_fmt(rec['tokens_per_s'])} | {_fmt(rec['peak_rss_mb'], 0)} | {_fmt(rec['import_s'], 2)} | "
                f"{_fmt(rec['load_s'], 2)} | {_fmt(ratio_p, 2)} | {_fmt(ratio_d, 2)} | {agree} | {others} |")
    return lines


def _side_table(rows, engines, bl) -> list[str]:
    peers = [e for e in engines if e != bl]
    lines = [f"#### Decode ms/token side by side (per step for batch > 1), and {bl}'s speed-up over each peer", "",
             "| model | mode | batch | " + " | ".join(engines) + " | " + " | ".join(f"{bl} vs {p}" for p in peers)
             + " |", "|---|---|---:|" + "---:|" * (len(engines) + len(peers))]
    mixed = False
    for model, mode, batch, found in rows:
        recs = {e: r for e, r in found.items() if e in engines and isinstance(r, dict)}
        if not recs:
            continue
        if len({r.get("run_id") for r in recs.values()}) > 1:
            batch, mixed = f"{batch}†", True
        ms = {e: r["decode_ms"] for e, r in recs.items()}
        b = ms.get(bl)
        cells = [_fmt(ms.get(e), 2) for e in engines]
        ratios = [_speedup(recs[p], recs[bl]) if b and p in ms else "—" for p in peers]
        lines.append(f"| {model} | {mode} | {batch} | " + " | ".join(cells + ratios) + " |")
    lines += ["", f"Speed-ups are medians of paired ratios: in each repeat, the peer's decode time over {bl}'s in "
                  "the same repeat (the engines take turns); in brackets the interquartile range of those ratios "
                  "(the range, under 4 repeats), which shows how much the machine's drift moved them."]
    if mixed:
        lines += ["", "† this cell's rows come from different runs, not one interleaved run: rerun it with "
                      "`--force` for a side-by-side comparison."]
    return lines


def _speedup(peer: dict, base: dict) -> str:
    """How many times faster base decodes than peer: '1.08× (1.02–1.15)', or of the medians alone."""
    paired = paired_ratio(peer, base)
    if paired is None:
        return f"{peer['decode_ms'] / base['decode_ms']:.2f}×"
    middle, low, high = paired
    return f"{middle:.2f}× ({low:.2f}–{high:.2f})"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def section_name(args) -> str:
    return f"{args.device} {args.precision}"


def markdown_document(tables: str, args, env: dict, done: dict) -> str:
    """One section of RESULTS.md (a device and precision): commands of the shown rows, hardware, versions, tables."""
    shown = [r for r in done.values()
             if r["device"] == args.device and r.get("precision", "fp32") == args.precision
             and r["model"] in args.models and r["engine"] in args.engines
             and r["mode"] in args.modes and r["batch"] in args.batch and r["new_tokens"] == args.new_tokens
             and r["prompt_tokens"] == args.prompt_tokens and r["repeats"] == args.repeats
             and r["threads"] == args.threads]
    runs = sorted({(r.get("run_id") or "?", r.get("command") or "?") for r in shown})
    sources = sorted({(r.get("run_id") or "?", r["versions"].get("onnxgen_runtime_src"), r.get("artifact"))
                      for r in shown if r["engine"] == "onnxgen"})
    sources_md = "\n".join(f"- run {run}: runtime source {rt}, {art}" for run, rt, art in sources) or "- none"
    cmds = "\n".join(f"{cmd}    # run {run}" for run, cmd in runs) + f"\n{command_line()}    # this report"
    versions, kernel = _run_environment(shown, env)
    name = section_name(args)
    return f"""{_BEGIN.format(name=name)}
## {args.device.upper()}, {PRECISION_TITLES.get(args.precision, args.precision + " weights")}

### Command

```
{cmds}
```

### Setup

- Hardware: {env['hardware']} (kernel {kernel})
- Device: {args.device}; {args.threads} intra-op threads for every engine (OMP/MKL env pinned too)
- Prompt {args.prompt_tokens} tokens (fixed random ids), exactly {args.new_tokens} new tokens (EOS suppressed by a
  minimum length), median of {args.repeats} runs, engines interleaved per run, each engine in its own process
- Models: random weights (torch.manual_seed(0)) of the real configs, {PRECISION_TITLES.get(args.precision, args.precision)}
- Repository commit when this report was written: {env['commit']}; onnxgen code each run measured (hashes of the
  runtime package's and the exporter's sources):

{sources_md}

| package | version |
|---|---|
{versions}

### Results

{tables}
{_END.format(name=name)}
"""


def _run_environment(shown: list, env: dict) -> tuple[str, str]:
    """The package-version table and kernel of the runs behind `shown`, as each run recorded them; rows written
    before runs recorded them fall back to this report's own environment, and the table says so."""
    recorded = [r for r in shown if "packages" in r]
    if not recorded or len(recorded) < len(shown):
        rows = "\n".join(f"| {k} | {v} |" for k, v in env["versions"].items())
        return rows + "\n\n(versions and kernel read when this report was written: these runs predate recording them)", env["kernel"]
    names: dict[str, None] = {}
    for r in recorded:
        names.update(dict.fromkeys(r["packages"]))
    rows = []
    for name in names:
        seen = sorted({r["packages"].get(name, "—") for r in recorded})
        rows.append(f"| {name} | {', '.join(seen)} |")
    kernels = sorted({r.get("kernel", "?") for r in recorded})
    return "\n".join(rows), ", ".join(kernels)


_BEGIN = "<!-- bench.py section {name}: written by `bench.py --write-md`; edits inside are overwritten -->"
_END = "<!-- end of bench.py section {name} -->"
_TITLE = "# onnxgen benchmark results\n\nProduced by `benchmarks/bench.py` (see `benchmarks/README.md`).\n"


def write_section(path, section: str, args) -> None:
    """Put `section` into the markdown file at `path`, replacing the same device/precision section if present;
    everything outside the generated sections (hand-written notes) is kept."""
    from pathlib import Path

    path = Path(path)
    name = section_name(args)
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    text = path.read_text() if path.exists() else _TITLE
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
