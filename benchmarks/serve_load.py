"""Serving throughput and latency: continuous batching against one request at a time, same model, same load.

Starts `onnxgen serve` (a child process) once per setting of --max-batch-rows, sends CLIENTS concurrent
streaming clients, each making REQUESTS greedy completions of exactly MAX_TOKENS tokens (min_tokens = max_tokens,
so every request costs the same), and prints one markdown table. A lone request through the server is also
timed against the same generation as a direct `TextGeneration` call.

    python benchmarks/serve_load.py                       # GPT-2 (124M config) from benchmarks/.cache
    python benchmarks/serve_load.py --model-dir DIR --clients 32 --batch-rows 1,8,32

Prompts are token-id arrays (OpenAI's `prompt: [[ids]]`), so any tokenizer works, including the benchmark
cache's synthetic one. Clients run in this process: on a small machine they share its cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

DEFAULT_MODEL = Path(__file__).resolve().parent / ".cache" / "gpt2" / "onnxgen"
MODEL_NAME = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, rows: int, queue: int, device: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "onnxgen.cli", "serve", str(model_dir), "--port", str(self.port),
                        "--device", device, "--model-name", MODEL_NAME, "--max-batch-rows", str(rows),
                        "--max-queue", str(queue), "--timeout", "0", "--log-level", "warning"]

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output: list[bytes] = []
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("server exited:\n" + b"".join(self.output).decode()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(60)


def _body(prompt: list[int], max_tokens: int) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "min_tokens": max_tokens}


async def _one(http: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(latency, time to first token, tokens) of one streamed completion."""
    started, first, pieces = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter()
                pieces += 1
    return time.perf_counter() - started, (first or time.perf_counter()) - started, pieces


async def _load(url: str, clients: int, requests: int, prompts: list[list[int]], max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []

    async def client(index: int) -> None:
        for r in range(requests):
            results.append(await _one(http, _body(prompts[(index * requests + r) % len(prompts)], max_tokens)))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await _one(http, _body(prompts[0], 2))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    firsts = sorted(r[1] for r in results)
    return {"wall": wall, "requests": len(results), "tokens": len(results) * max_tokens,
            "latency": latencies, "ttft": firsts}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _lone(model_dir: Path, url: str, prompt: list[int], max_tokens: int, device: str, repeats: int) -> tuple:
    """Median seconds of one request through the server and of the same generation as a direct call,
    alternated so that both see the same background load."""
    from onnxgen import TextGeneration

    tg = TextGeneration(model_dir, device=device)
    body = dict(_body(prompt, max_tokens), stream=False)
    direct, served = [], []
    with httpx.Client(base_url=url, timeout=600) as http:
        for i in range(repeats + 1):  # the first round warms both up
            started = time.perf_counter()
            tg.generate_ids([prompt], do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens)
            middle = time.perf_counter()
            http.post("/v1/completions", json=body).raise_for_status()
            if i:
                direct.append(middle - started)
                served.append(time.perf_counter() - middle)
    return statistics.median(direct), statistics.median(served)


def _wait_idle(seconds: float, threshold: float = 0.5) -> None:
    """Wait (up to `seconds`) for the 1-minute load average to fall below `threshold`: other work on the
    machine skews every number here."""
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)


SECTION = "## Serving"


def markdown(args, table: list, lone: tuple[float, float], load_before: float) -> str:
    import numpy
    import onnxruntime

    base = table[0][1]["tokens"] / table[0][1]["wall"]
    lines = [
        SECTION, "",
        f"`{command_line()}`", "",
        f"{args.clients} concurrent streaming clients x {args.requests} requests each, greedy, {args.prompt_tokens} "
        f"prompt tokens, exactly {args.max_tokens} new tokens per request; model `{args.model_dir}`, device "
        f"{args.device}. `max batch rows` is `onnxgen serve --max-batch-rows`: 1 serves one request at a time.", "",
        "| max batch rows | requests | wall s | tokens/s | vs first row | req/s | latency p50 s | latency p95 s "
        "| TTFT p50 s | TTFT p95 s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows, r in table:
        tps = r["tokens"] / r["wall"]
        lines.append(f"| {rows} | {r['requests']} | {r['wall']:.1f} | {tps:.0f} | {tps / base:.2f}x | "
                     f"{r['requests'] / r['wall']:.2f} | {_pct(r['latency'], .5):.2f} | "
                     f"{_pct(r['latency'], .95):.2f} | {_pct(r['ttft'], .5):.2f} | {_pct(r['ttft'], .95):.2f} |")
    direct, served = lone
    lines += [
        "",
        f"A lone request ({args.max_tokens} tokens, median of {args.lone_repeats}): direct `TextGeneration` call "
        f"{direct * 1000:.0f} ms, through the server {served * 1000:.0f} ms ({served / direct:.2f}x).", "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (1-minute load average "
        f"{load_before:.1f} at the start; the clients run on the same cores), Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}.",
    ]
    return "\n".join(lines) + "\n"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_section(path: Path, text: str) -> None:
    """Put `text` in place of the file's SECTION (up to the next "## " heading), or append it: other
    sections of the file are left as they are."""
    old = path.read_text() if path.exists() else ""
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        rest = "" if end < 0 else old[end + 1 :]
        new = old[:start] + text + ("\n" + rest if rest else "")
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch-rows", default="1,16", help="comma-separated --max-batch-rows settings")
    parser.add_argument("--lone-repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--write-md", type=Path, default=None,
                        help=f"also put the table in this file's {SECTION!r} section (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="first wait up to this long for the load average to drop below 0.5")
    args = parser.parse_args(argv)
    if not (args.model_dir / "onnxgen.json").exists():
        parser.error(f"{args.model_dir} is not an onnxgen export; build it with `python benchmarks/models.py` "
                     "or pass --model-dir")
    vocab = json.loads((args.model_dir / "onnxgen.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(args.prompt_tokens)] for _ in range(64)]
    rows_settings = [int(x) for x in args.batch_rows.split(",")]
    _wait_idle(args.wait_idle)
    load_before = os.getloadavg()[0]

    table, raw = [], {}
    for rows in rows_settings:
        with Server(args.model_dir, rows, args.clients * args.requests + 1, args.device) as server:
            result = asyncio.run(_load(server.url, args.clients, args.requests, prompts, args.max_tokens))
            if rows == max(rows_settings):
                raw["lone"] = _lone(args.model_dir, server.url, prompts[0], args.max_tokens, args.device,
                                    args.lone_repeats)
        raw[rows] = result
        table.append((rows, result))

    text = markdown(args, table, raw["lone"], load_before)
    print(text)
    if args.write_md:
        write_section(args.write_md, text)
        print(f"wrote the {SECTION!r} section of {args.write_md}")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in raw.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
