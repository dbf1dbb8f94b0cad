"""A bounded load test: 64 concurrent clients against `onnxgen serve` (a child process) on loopback.

Every answer must be a completion or a clean 429 (queue full, with Retry-After); the server must be alive and
idle afterwards, and its resident memory must stay flat across rounds.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

import httpx
import pytest
from server_helpers import MODEL_NAME, ProcessServer

CLIENTS = 64
REQUESTS_PER_CLIENT = 2
ROUNDS = 3  # after a warm-up round
RSS_GROWTH_LIMIT = 40 * 2**20  # bytes, from the end of the warm-up round to the end of the last round

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's RSS from /proc")


def _request(rng: random.Random) -> dict:
    body = {"model": MODEL_NAME, "prompt": rng.choice(["Hello, my dog", "The quick brown fox", "Once upon a time"]),
            "max_tokens": rng.choice([4, 8, 16, 32]), "stream": rng.random() < 0.3}
    if rng.random() < 0.5:
        body.update(temperature=0)
    else:
        body.update(seed=rng.randrange(1000), n=rng.choice([1, 2]))
    return body


async def _client(http: httpx.AsyncClient, seed: int, outcomes: list) -> None:
    rng = random.Random(seed)
    for _ in range(REQUESTS_PER_CLIENT):
        body = _request(rng)
        async with http.stream("POST", "/v1/completions", json=body) as response:
            raw = await response.aread()
        outcomes.append((body, response.status_code, dict(response.headers), raw.decode()))


def _check(body: dict, status: int, headers: dict, text: str) -> str:
    if status in (429, 503):
        assert json.loads(text)["error"]["message"] and headers.get("retry-after") == "1"
        return str(status)
    assert status == 200, (status, text)
    expected = body.get("n", 1)
    if body["stream"]:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks)
        finished = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        assert len(finished) == expected
    else:
        answer = json.loads(text)
        assert len(answer["choices"]) == expected
        assert all(c["finish_reason"] in ("length", "stop") for c in answer["choices"])
        assert answer["usage"]["completion_tokens"] <= body["max_tokens"] * expected
    return "200"


async def _round(base_url: str, seed: int) -> dict[str, int]:
    outcomes: list = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(_client(http, seed * 1000 + i, outcomes) for i in range(CLIENTS)))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        kind = _check(*outcome)
        counts[kind] = counts.get(kind, 0) + 1
    assert sum(counts.values()) == CLIENTS * REQUESTS_PER_CLIENT
    return counts


def test_64_concurrent_clients(tiny_gpt2_onnx):
    args = ["--max-batch-rows", "16", "--max-queue", "24", "--max-tokens-limit", "64", "--log-level", "warning"]
    with ProcessServer(tiny_gpt2_onnx, *args) as server:
        warmup = asyncio.run(_round(server.base_url, 0))
        rss_after_warmup = server.rss_bytes()
        totals: dict[str, int] = {}
        for seed in range(1, ROUNDS + 1):
            for kind, count in asyncio.run(_round(server.base_url, seed)).items():
                totals[kind] = totals.get(kind, 0) + count
        growth = server.rss_bytes() - rss_after_warmup
        health = httpx.get(server.base_url + "/health", timeout=10).json()
        after = httpx.post(server.base_url + "/v1/completions", timeout=30,
                           json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4})
    print(f"warm-up {warmup}, rounds {totals}, RSS growth {growth / 2**20:.1f} MiB")
    assert totals.get("200", 0) >= CLIENTS  # most work got through
    assert health["status"] == "ok" and health["queue_depth"] == 0 and health["running_requests"] == 0
    assert after.status_code == 200
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
