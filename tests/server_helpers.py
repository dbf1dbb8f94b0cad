"""Run the real server (uvicorn on loopback) for the server tests: in a thread, or as `onnxgen serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import uvicorn
from onnxgen.server import ServerLimits, create_app

MODEL_NAME = "tiny"


class ThreadServer:
    """uvicorn serving `create_app(...)` on 127.0.0.1 from a background thread of this process."""

    def __init__(self, model, *, limits: ServerLimits | None = None, model_name: str = MODEL_NAME):
        self.app = create_app(model, limits=limits, model_name=model_name, device="cpu")
        self.context = self.app.state.context
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else Nagle adds ~40 ms per answer)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="x", max_retries=0, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProcessServer:
    """`python -m onnxgen.cli serve MODEL_DIR ...` as a child process (for signals and memory)."""

    def __init__(self, model_dir: Path, *args: str):
        self.port = free_port()
        self.command = [sys.executable, "-m", "onnxgen.cli", "serve", str(model_dir), "--port", str(self.port),
                        "--device", "cpu", "--model-name", MODEL_NAME, *args]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ProcessServer:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        # Drain the server's output as it comes: a full pipe would block the server on its next log line.
        self.output: list[bytes] = []
        self.reader = threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                self.reader.join(5)
                raise RuntimeError(f"the server exited: {self.log()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(5)
        self.process.stdout.close()

    def log(self) -> str:
        """What the server printed so far (complete once the process has exited and the reader joined)."""
        return b"".join(self.output).decode(errors="replace")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a streamed answer, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
