"""onnxgen's two GPT-2 graphs side by side: optimum's export (dynamic past) against the builder's fused graph
(GroupQueryAttention over static key/value buffers, last-position logits), same weights, same process.

Both run through onnxgen's own TextGeneration; the repeats alternate between the two. Per repeat each graph
generates 1 token and then N tokens from the same prompt (min_new_tokens = N, so no early stop):

    prompt ms        median T(1): the prompt's forward pass plus one step
    decode ms/token  median of (T(N) - T(1)) / (N - 1): one decoding step for the whole batch
    total ms/token   median T(N) / N

    python benchmarks/compare_graphs.py                        # gpt2, batch 1, greedy, 32-token prompt, 64 new
    python benchmarks/compare_graphs.py --mode beam4 --batch 1 --repeats 3

The random-weight checkpoint is the benchmark's own (models.py: the published config, torch.manual_seed(0));
both graphs are built from it once under benchmarks/.cache/<model>/compare-{dynamic,static}/.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402

MODES = {"greedy": dict(do_sample=False), "beam4": dict(num_beams=4), "sample": dict(do_sample=True, top_k=50)}
GRAPHS = ("dynamic", "static")


def builder_fingerprint() -> str:
    digest = hashlib.sha256()
    for f in sorted((models.REPO_DIR / "export").rglob("*.py")):
        digest.update(f.relative_to(models.REPO_DIR).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def ensure_graphs(model: str) -> dict[str, Path]:
    """Build (or reuse) the dynamic export and the static directory beside it."""
    hf = models.ensure(model, "hf")
    dirs = {name: models.CACHE_DIR / model / f"compare-{name}" for name in GRAPHS}
    fingerprint = builder_fingerprint()
    if all((d / ".done").exists() and (d / ".done").read_text() == fingerprint for d in dirs.values()):
        return dirs
    from onnxgen.export import export_model
    from onnxgen.export.builders import GPT2_OPTIMIZATIONS, write_gpt2
    from onnxgen.manifest import load_manifest
    from transformers import GPT2LMHeadModel

    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    export_model(hf, dirs["dynamic"], force=True, verify=False)
    static = dirs["static"]
    static.mkdir(parents=True)
    for f in dirs["dynamic"].iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".onnx.data", "onnxgen.json", ".done")):
            shutil.copy(f, static / f.name)
    spec = write_gpt2(GPT2LMHeadModel.from_pretrained(hf).eval(), static)
    manifest = load_manifest(dirs["dynamic"])
    dataclasses.replace(manifest, graphs={"decoder": spec}, optimizations=GPT2_OPTIMIZATIONS).save(static)
    for d in dirs.values():
        (d / ".done").write_text(fingerprint)
    return dirs


def time_generation(tg, prompts, new_tokens: int, mode: str) -> tuple[float, list]:
    kwargs = dict(MODES[mode], max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=0)
    start = time.perf_counter()
    ids = tg.generate_ids(prompts, **kwargs)
    return time.perf_counter() - start, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", choices=[m for m in models.MODELS if models.family(m) == "gpt2"])
    parser.add_argument("--mode", default="greedy", choices=sorted(MODES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="intra_op_num_threads of both sessions")
    parser.add_argument("--build-only", action="store_true", help="build the two graphs and stop")
    args = parser.parse_args(argv)

    dirs = ensure_graphs(args.model)
    if args.build_only:
        print("\n".join(f"{name}: {path}" for name, path in dirs.items()))
        return 0
    import numpy as np
    import onnxruntime

    from onnxgen import TextGeneration

    engines = {name: TextGeneration(dirs[name], device="cpu", intra_op_threads=args.threads) for name in GRAPHS}
    rng = np.random.default_rng(0)
    eos = engines["dynamic"].manifest.special_tokens.eos_token_id
    vocab = [i for i in range(engines["dynamic"].manifest.vocab_size) if i != eos]
    prompts = [[int(t) for t in rng.choice(vocab, args.prompt_tokens)] for _ in range(args.batch)]
    for tg in engines.values():  # warm-up: first-run allocations and page faults
        time_generation(tg, prompts, 4, args.mode)
    one = {name: [] for name in GRAPHS}
    full = {name: [] for name in GRAPHS}
    tokens = {}
    for repeat in range(args.repeats):
        order = GRAPHS if repeat % 2 == 0 else GRAPHS[::-1]
        for name in order:
            one[name].append(time_generation(engines[name], prompts, 1, args.mode)[0])
            seconds, tokens[name] = time_generation(engines[name], prompts, args.new_tokens, args.mode)
            full[name].append(seconds)

    n = args.new_tokens
    rows = {}
    for name in GRAPHS:
        decode = [(f - o) / (n - 1) for f, o in zip(full[name], one[name])]
        rows[name] = (statistics.median(one[name]) * 1e3, statistics.median(decode) * 1e3,
                      statistics.median(full[name]) / n * 1e3)
    print(f"{args.model}, {args.mode}, batch {args.batch}, {args.prompt_tokens}-token prompt, {n} new tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    print()
    print("| graph | prompt ms | decode ms/token | total ms/token |")
    print("|---|---|---|---|")
    labels = {"dynamic": "optimum export (dynamic past)", "static": "fused GQA, static KV, last logits"}
    for name in GRAPHS:
        print(f"| {labels[name]} | {rows[name][0]:.1f} | {rows[name][1]:.2f} | {rows[name][2]:.2f} |")
    ratio = [rows["dynamic"][i] / rows["static"][i] for i in range(3)]
    print(f"| dynamic / static | {ratio[0]:.2f}x | {ratio[1]:.2f}x | {ratio[2]:.2f}x |")
    print(f"\nsame tokens from both graphs: {'yes' if tokens['dynamic'] == tokens['static'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
