"""`vllm serve` of a ptq_ascend checkpoint under load and abuse, on 127.0.0.1.

64 concurrent greedy completions: no error, and the same tokens as the offline API
(`LLM.generate`, tests/engine_runner.py) on the same prompts, dtype and max_model_len.
Then a streaming client that disconnects mid-stream, a prompt longer than max_model_len,
bad JSON and a bad parameter: each gets a clear error (or none, for the disconnect), and the
server still answers a normal request correctly afterwards. The server stops cleanly on SIGINT.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.engine_runner import run_engines
from tests.vllm_server import kill_server, post, start_server, stop_server

pytestmark = pytest.mark.engine

N_REQUESTS = 64
MAX_TOKENS = 8
MAX_MODEL_LEN = 512  # as in engine_runner.run_job
DTYPE = "float32"  # as in engine_runner.run_job's default
REQUEST_TIMEOUT = 60
# prompts as token ids (vocab 512; id 0-2 are special): different lengths, deterministic
PROMPTS = [[3 + (i * 37 + j * 11) % 500 for j in range(3 + i % 13)] for i in range(N_REQUESTS)]


@pytest.fixture(scope="module")
def expected(make_ckpt):
    """Greedy continuations from the offline API, in a fresh process (engine_runner)."""
    (res,) = run_engines(
        [
            {
                "model": str(make_ckpt("w8a8-dynamic")),
                "dtype": DTYPE,
                "prompts": PROMPTS,
                "max_tokens": MAX_TOKENS,
            }
        ]
    )
    assert "error" not in res, res
    assert res["quantization_used"] == "ptq_ascend"
    return res["output_token_ids"]


@pytest.fixture(scope="module")
def server(make_ckpt, expected, tmp_path_factory):
    ckpt = make_ckpt("w8a8-dynamic")  # marked by our recipe: ptq_ascend with no flag
    log = tmp_path_factory.mktemp("serve-load") / "server.log"
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--dtype", DTYPE, "--seed", "0"]
    s = start_server(ckpt, log, *args, ready_timeout=120)
    yield s
    kill_server(s)


def complete(server, i: int) -> list[int]:
    body = {
        "model": server.model,
        "prompt": PROMPTS[i],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
    }
    out = post(f"{server.base}/v1/completions", body, timeout=REQUEST_TIMEOUT)
    return out["choices"][0]["token_ids"]


def raw_request(server, body: bytes) -> tuple[int, dict]:
    """POST raw bytes to /v1/completions; (status, JSON body) for errors as for success."""
    req = urllib.request.Request(f"{server.base}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def error_message(body: dict) -> str:
    err = body.get("error", body.get("detail", body))
    return json.dumps(err) if not isinstance(err, dict) else str(err.get("message", err))


def still_serves(server, expected, i: int = 5) -> None:
    assert complete(server, i) == expected[i]


def test_concurrent_completions_match_offline(server, expected):
    barrier = threading.Barrier(N_REQUESTS, timeout=REQUEST_TIMEOUT)

    def one(i):
        barrier.wait()  # all 64 in flight together
        return complete(server, i)

    start = time.time()
    with ThreadPoolExecutor(max_workers=N_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(N_REQUESTS)]
        got = [f.result(timeout=2 * REQUEST_TIMEOUT) for f in futures]  # any error re-raises here
    assert time.time() - start < 2 * REQUEST_TIMEOUT
    mismatched = [i for i in range(N_REQUESTS) if got[i] != expected[i]]
    assert not mismatched, [(i, got[i], expected[i]) for i in mismatched[:5]]


def test_streaming_client_disconnects_mid_stream(server, expected):
    url = urllib.parse.urlsplit(server.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT)
    long = MAX_MODEL_LEN - len(PROMPTS[0])  # far more than the client will read
    body = {
        "model": server.model,
        "prompt": PROMPTS[0],
        "max_tokens": long,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    chunks = 0
    while chunks < 3:  # a few server-sent events, then hang up
        line = resp.readline()
        assert line, "stream ended early"
        chunks += line.startswith(b"data: ")
    conn.sock.close()
    conn.close()
    # (the tiny model may finish the request before the server notices the hang-up, so
    # whether it was aborted is not checked; only that the server is unharmed)
    still_serves(server, expected)
    assert "Traceback" not in server.log.read_text()


def test_prompt_longer_than_max_model_len_is_a_400(server, expected):
    status, body = raw_request(
        server,
        json.dumps({"model": server.model, "prompt": [5] * (MAX_MODEL_LEN + 10), "max_tokens": 4}).encode(),
    )
    assert status == 400, body
    assert "maximum context length" in error_message(body), body
    still_serves(server, expected)


@pytest.mark.parametrize(
    "body, mentions",
    [
        (b'{"model": "m", "prompt": "hi", "max_tokens": ', "json"),  # truncated JSON
        (b"not json at all", "json"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),  # a bad parameter
    ],
)
def test_invalid_requests_are_client_errors(server, expected, body, mentions):
    if isinstance(body, dict):
        body = json.dumps({"model": server.model, **body}).encode()
    status, reply = raw_request(server, body)
    assert status in (400, 422), (status, reply)
    assert mentions in error_message(reply).lower(), reply
    still_serves(server, expected)


def test_server_stops_cleanly(server):
    import psutil

    children = psutil.Process(server.proc.pid).children(recursive=True)
    rc = stop_server(server)
    text = server.log.read_text()
    assert "quantization=ptq_ascend" in text
    assert rc == 0, text[-2000:]
    # no error while serving; vLLM 0.32 itself logs EngineDeadError while it shuts down on SIGINT
    assert "Traceback" not in text.split("[shutdown]")[0], text[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
