"""`vllm serve DIR --quantization ptq_ascend` on 127.0.0.1: completions, chat, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.engine


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(make_ckpt, tmp_path_factory):
    ckpt = make_ckpt("w4a16-g64-asym")  # an unmarked llmcompressor checkpoint: the flag selects us
    port = free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [
        str(vllm_cli),
        "serve",
        str(ckpt),
        "--quantization",
        "ptq_ascend",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--dtype",
        "bfloat16",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"server not healthy in 240 s:\n{log.read_text()[-3000:]}")
    yield base, proc, log, str(ckpt)
    if proc.poll() is None:
        proc.kill()


def test_completions(server):
    base, _, _, model = server
    out = post(
        f"{base}/v1/completions",
        {"model": model, "prompt": "Melanie sold", "max_tokens": 5, "temperature": 0},
    )
    assert out["usage"]["completion_tokens"] == 5
    assert isinstance(out["choices"][0]["text"], str) and out["choices"][0]["text"]


def test_chat_completions(server):
    base, _, _, model = server
    out = post(
        f"{base}/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": "How many apples?"}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] >= 1


def test_server_used_ptq_ascend_and_stops_cleanly(server):
    _, proc, log, _ = server
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    text = log.read_text()
    assert "quantization=ptq_ascend" in text
    assert rc == 0, text[-2000:]
