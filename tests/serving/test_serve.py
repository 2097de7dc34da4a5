"""`vllm serve DIR --quantization ptq_ascend` on 127.0.0.1: completions, chat, clean stop."""

from __future__ import annotations

import pytest

from tests.vllm_server import kill_server, post, start_server, stop_server

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(make_ckpt, tmp_path_factory):
    ckpt = make_ckpt("w4a16-g64-asym")  # an unmarked llmcompressor checkpoint: the flag selects us
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [
        "--quantization",
        "ptq_ascend",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--dtype",
        "bfloat16",
    ]
    s = start_server(ckpt, log, *args)
    yield s
    kill_server(s)


def test_completions(server):
    out = post(
        f"{server.base}/v1/completions",
        {"model": server.model, "prompt": "Melanie sold", "max_tokens": 5, "temperature": 0},
    )
    assert out["usage"]["completion_tokens"] == 5
    assert isinstance(out["choices"][0]["text"], str) and out["choices"][0]["text"]


def test_chat_completions(server):
    out = post(
        f"{server.base}/v1/chat/completions",
        {
            "model": server.model,
            "messages": [{"role": "user", "content": "How many apples?"}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] >= 1


def test_server_used_ptq_ascend_and_stops_cleanly(server):
    rc = stop_server(server)
    text = server.log.read_text()
    assert "quantization=ptq_ascend" in text
    assert rc == 0, text[-2000:]
