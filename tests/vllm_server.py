"""`vllm serve` for a test: the package's server helpers (vllm_ptq_ascend/eval/server.py), with
a failed start reported as a test failure that carries the server's log."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from vllm_ptq_ascend.eval.server import Server, ServerError, kill_server, stop_server
from vllm_ptq_ascend.eval.server import start_server as _start_server

__all__ = ["Server", "kill_server", "post", "start_server", "stop_server"]


def post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(ckpt: Path, log: Path, *args: str, ready_timeout: float = 240) -> Server:
    """`vllm serve CKPT ARGS` with the environment of the tests (in-process engine core:
    VLLM_ENABLE_V1_MULTIPROCESSING=0 from apply_cpu_defaults), once /health answers 200."""
    try:
        return _start_server(ckpt, log, *args, ready_timeout=ready_timeout)
    except ServerError as e:
        pytest.fail(str(e))
