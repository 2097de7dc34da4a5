"""`vllm serve` on 127.0.0.1 for a measurement: start it, stream completions with timings, stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """The server did not start, or died; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path
    model: str


def _log_tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def start_server(model: str | Path, log: Path, *args: str, ready_timeout: float = 240) -> Server:
    """`vllm serve MODEL ARGS` on a free port of 127.0.0.1, returned once /health answers 200."""
    port = free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    cmd = [str(vllm_cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = Server(f"http://127.0.0.1:{port}", proc, log, str(model))
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"vllm serve {model} exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{server.base}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    kill_server(server)
    raise ServerError(f"vllm serve {model}: not healthy in {ready_timeout:.0f} s:\n{_log_tail(log)}")


def stop_server(server: Server, timeout: float = 60) -> int:
    """SIGINT (as Ctrl-C), wait; returns the exit code (-9 if it had to be killed)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_server(server)
    return server.proc.returncode


def kill_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


@dataclass(frozen=True)
class StreamTiming:
    ttft_s: float  # request sent -> first token received
    total_s: float
    tokens: int

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        return (self.total_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else None


def stream_completion(
    base: str, model: str, prompt_ids: list[int], max_tokens: int, timeout: float = 600
) -> StreamTiming:
    """One streamed /v1/completions request of exactly ``max_tokens`` tokens (ignore_eos)."""
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"{base}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    total = time.perf_counter() - t0
    if first is None or tokens == 0:
        raise ServerError(f"{base}: a streamed completion returned no tokens")
    return StreamTiming(first - t0, total, tokens)


def stream_many(
    base: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int
) -> tuple[list[StreamTiming], float]:
    """All prompts, ``concurrency`` at a time; (timings, wall seconds)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        timings = list(pool.map(lambda p: stream_completion(base, model, p, max_tokens), prompts))
    return timings, time.perf_counter() - t0
