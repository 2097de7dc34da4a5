"""What an fp8 KV cache costs SmolLM2-135M-Instruct by itself, and how much of it is vLLM-CPU's rounding.

The unquantized model (float32) scores the held-out text of ``eval`` three times: with its keys and
values as computed, read back from an fp8 (e4m3) cache rounded to nearest, and read back from one
rounded toward zero, which is what vLLM-CPU 0.32's cache write does (pinned in
tests/serving/test_kv_cache_serving.py). The scales are those ``quantize --kv-cache fp8`` calibrated
(from a checkpoint of benchmarks/kv_cache_smollm2.sh). The fp8 arithmetic is the float64 test
reference's (tests/reference.py). Not a test: a table and a JSON with machine and date.

    .venv/bin/python benchmarks/kv_rounding_smollm2.py [--scales CKPT_DIR] [--out NAME]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, machine, machine_line  # noqa: E402

from tests import reference  # noqa: E402  (the fp8 cache arithmetic of the engine test)

DEFAULT_SCALES = ROOT / ".cache/bench-kv/smollm2-w8a8-dynamic-kv-fp8"


def perplexity(model, tokenizer, texts: list[str], max_len: int) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:max_len]])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            total -= float(logp[:-1].gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return math.exp(total / count), count


def main() -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptq_ascend.assets.embedded import embedded_model_dir
    from vllm_ptq_ascend.assets.shipped_text import held_out_texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=Path, default=DEFAULT_SCALES, help="a --kv-cache fp8 checkpoint")
    parser.add_argument("--out", default="kv_rounding_smollm2", help="results name under benchmarks/results/")
    args = parser.parse_args()
    sd = {k: v for f in sorted(args.scales.glob("*.safetensors")) for k, v in load_file(f).items()}
    base = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = held_out_texts()
    rows = []
    caches = (
        ("bf16 cache (keys and values as computed)", None),
        ("fp8, round to nearest", "nearest"),
        ("fp8, round toward zero (vLLM-CPU)", "toward_zero"),
    )
    for label, rounding in caches:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        if rounding is not None:
            reference._use_kv_fp8(model, sd, rounding)
        ppl, tokens = perplexity(model, tokenizer, texts, 4095)
        rows.append({"cache": label, "rounding": rounding, "perplexity": ppl, "tokens": tokens})
        print(f"{label}: perplexity {ppl:.4f} over {tokens} tokens", flush=True)
    for r in rows:
        r["change_pct"] = 100 * (r["perplexity"] / rows[0]["perplexity"] - 1)
    info = machine()
    result = {
        "machine": info,
        "created": info["date"],
        "model": "SmolLM2-135M-Instruct (embedded), float32, unquantized weights",
        "scales": str(args.scales.relative_to(ROOT) if args.scales.is_relative_to(ROOT) else args.scales),
        "rows": rows,
    }
    out = RESULTS
    (out / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# fp8 KV cache alone on SmolLM2-135M-Instruct ({result['created']})",
        "",
        f"{machine_line(info)}. {result['model']}; KV scales from `{result['scales']}` (one per layer, "
        "calibrated by `quantize --kv-cache fp8`); perplexity on `eval`'s held-out text, keys and values "
        "read back from the cache as tests/reference.py does.",
        "",
        "| cache | perplexity | change |",
        "|---|---:|---:|",
        *[f"| {r['cache']} | {r['perplexity']:.4f} | {r['change_pct']:+.2f}% |" for r in rows],
        "",
    ]
    (out / f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
