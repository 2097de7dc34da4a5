"""SmolLM2-135M W8A8: ptq_ascend vs stock compressed-tensors (same checkpoint) vs bf16, on vLLM-CPU.

Each configuration runs in its own process (so peak RSS is its own), with a warm-up
and REPEATS measured runs; configurations take turns for ROUNDS rounds, so slow drift
of the machine hits all alike; the median over all runs is reported. Prints a Markdown table and saves
JSON + Markdown under benchmarks/results/.

    .venv/bin/python benchmarks/bench_w8a8_cpu.py [--rounds 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import RESULTS, machine, machine_line

CONFIGS = {  # name -> (model key, quantization flag)
    "bf16": ("base", None),
    "w8a8 ptq_ascend": ("w8a8", "ptq_ascend"),
    "w8a8 stock compressed-tensors": ("w8a8", "compressed-tensors"),
}


def models() -> dict[str, str]:
    from vllm_ptq_ascend.assets.embedded import embedded_model_dir
    from vllm_ptq_ascend.env import repo_cache_root
    from vllm_ptq_ascend.recipes.quantize import quantize

    base = embedded_model_dir()
    ckpt = repo_cache_root() / "demo" / "smollm2-w8a8"
    if not (ckpt / "config.json").is_file():
        quantize(base, ckpt, "w8a8-dynamic")
    return {"base": str(base), "w8a8": str(ckpt)}


def run_one(model: str, quantization: str | None, repeats: int) -> dict:
    """Child process: load one configuration, measure, print JSON."""
    from vllm import LLM

    from vllm_ptq_ascend.eval.basic import peak_rss_mib, throughput

    llm = LLM(
        model,
        quantization=quantization,
        dtype="bfloat16",
        max_model_len=1024,
        enforce_eager=True,
        enable_prefix_caching=False,  # else the measured prompts are cache hits of the warm-up
    )
    used = llm.llm_engine.vllm_config.model_config.quantization
    runs = [throughput(llm, n_prompts=8, prompt_len=256, gen_len=64) for _ in range(repeats)]
    return {
        "quantization_used": used,
        "prefill_tok_s": statistics.median(r.prefill_tok_s for r in runs),
        "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
        "prefill_runs": [r.prefill_tok_s for r in runs],
        "decode_runs": [r.decode_tok_s for r in runs],
        "peak_rss_mib": peak_rss_mib(),
    }


def merge_runs(rs: list[dict]) -> dict:
    """One configuration's rounds: medians over every run, the largest peak RSS."""
    prefill = [x for r in rs for x in r["prefill_runs"]]
    decode = [x for r in rs for x in r["decode_runs"]]
    return {
        "quantization_used": rs[0]["quantization_used"],
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "prefill_runs": prefill,
        "decode_runs": decode,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "QUANT"))
    args = ap.parse_args()
    from vllm_ptq_ascend.env import apply_cpu_defaults

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    apply_cpu_defaults()
    if args.child:
        model, quant = args.child
        print(json.dumps(run_one(model, None if quant == "none" else quant, args.repeats)))
        return
    paths = models()
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, (key, quant) in CONFIGS.items():
            print(f"[bench] round {r + 1}/{args.rounds}: {name} ...", flush=True)
            child = ["--repeats", str(args.repeats), "--child", paths[key], quant or "none"]
            out = subprocess.run(
                [sys.executable, __file__, *child], capture_output=True, text=True, check=True
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {name: merge_runs(rs) for name, rs in runs.items()}
    ours, stock = rows["w8a8 ptq_ascend"], rows["w8a8 stock compressed-tensors"]
    ratio = {k: ours[k] / stock[k] for k in ("prefill_tok_s", "decode_tok_s")}
    info = machine()
    lines = [
        f"# SmolLM2-135M W8A8 on vLLM-CPU ({info['date']})",
        "",
        machine_line(info) + ".",
        "Batch of 8 prompts x 256 tokens; decode 64 tokens each; bf16 activations; median of "
        f"{args.rounds} rounds x {args.repeats} runs (configurations alternate), each process warmed up.",
        "",
        "| configuration | served by | prefill tok/s | decode tok/s | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['quantization_used'] or 'unquantized'} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_tok_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        f"ptq_ascend / stock on the same checkpoint: prefill {ratio['prefill_tok_s']:.2f}x, "
        f"decode {ratio['decode_tok_s']:.2f}x (goal: >= 1.0x).",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "w8a8_cpu.md").write_text(table + "\n")
    (RESULTS / "w8a8_cpu.json").write_text(
        json.dumps(
            {
                "machine": info,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "rows": rows,
                "ratio_ptq_over_stock": ratio,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
