"""Start `vllm serve` on 127.0.0.1 (a free port) for a test, talk to it, stop it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port


def post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path
    model: str


def start_server(ckpt: Path, log: Path, *args: str, ready_timeout: float = 240) -> Server:
    """`vllm serve CKPT ARGS` with the environment of the tests (in-process engine core:
    VLLM_ENABLE_V1_MULTIPROCESSING=0 from apply_cpu_defaults), once /health answers 200."""
    port = free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    cmd = [str(vllm_cli), "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return Server(base, proc, log, str(ckpt))
        except OSError:
            time.sleep(1)
    proc.kill()
    proc.wait()
    pytest.fail(f"server not healthy in {ready_timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server, timeout: float = 60) -> int:
    """SIGINT (as Ctrl-C), wait; returns the exit code (-9 if it had to be killed)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


def kill_server(server: Server) -> None:
    """Teardown after a failed test: no process left behind."""
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()
