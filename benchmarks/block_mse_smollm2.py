"""Where a 4-bit checkpoint loses accuracy, block by block: each decoder block of the written checkpoint
against the bf16 model's block, on the same inputs.

The inputs of every decoder block are captured from the unquantized model on held-out GSM8K worked
solutions (the perplexity texts of bench_recipes.py, never calibrated on). Each checkpoint is loaded
as written (transformers + compressed-tensors' fake quantization, online transforms attached:
``self_check.load_written``), and its block i is run on the unquantized block i's inputs. The number
is the block's relative error ||y_q - y||² / ||y||² over all tokens. Presets that only change linear
layers or norms inside a block (round-to-nearest, GPTQ, QuIP, FlatQuant) can be compared this way.
SpinQuant's R1 rotates the residual stream between blocks, so its blocks take other inputs: it is left out.

    .venv/bin/python benchmarks/block_mse_smollm2.py --name STEM LABEL=CKPT_DIR [LABEL=CKPT_DIR ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import json  # noqa: E402

from common import RESULTS, machine, machine_line  # noqa: E402


def decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.model.layers)


def capture(model, ids: torch.Tensor) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, output hidden states) of every decoder block for one forward of ``ids``."""
    calls: list = []
    hooks = []
    for layer in decoder_layers(model):

        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            calls.append((args, kwargs, out.detach()))

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return calls


def block_errors(model, captured: list[list[tuple]]) -> list[float]:
    """Relative squared error of each of ``model``'s blocks on the captured inputs, over all texts."""
    layers = decoder_layers(model)
    num = [0.0] * len(layers)
    den = [0.0] * len(layers)
    with torch.no_grad():
        for calls in captured:
            for i, (args, kwargs, ref) in enumerate(calls):
                out = layers[i](*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                num[i] += float(((out.double() - ref.double()) ** 2).sum())
                den[i] += float((ref.double() ** 2).sum())
    return [n / d for n, d in zip(num, den)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="LABEL=CKPT_DIR")
    ap.add_argument("--name", default="block_mse_smollm2")
    ap.add_argument("--max-tokens", type=int, default=512, help="tokens per held-out text")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptq_ascend.assets.embedded import embedded_model_dir
    from vllm_ptq_ascend.assets.shipped_text import held_out_texts
    from vllm_ptq_ascend.recipes.self_check import load_written

    base = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    texts = [torch.tensor([tok(t)["input_ids"][: args.max_tokens]]) for t in held_out_texts()]
    ref_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    captured = [capture(ref_model, ids) for ids in texts]
    del ref_model
    results = {}
    for spec in args.checkpoints:
        label, _, path = spec.partition("=")
        model = load_written(path, "float32")
        results[label] = {"checkpoint": path, "block_rel_err": block_errors(model, captured)}
        del model
        errs = results[label]["block_rel_err"]
        print(f"[block-mse] {label}: mean {sum(errs) / len(errs):.4g}", flush=True)
    info = machine()
    labels = list(results)
    n = len(next(iter(results.values()))["block_rel_err"])
    lines = [
        f"# Block-by-block relative error on SmolLM2-135M ({info['date']})",
        "",
        machine_line(info) + ".",
        "",
        "Each checkpoint's decoder block i, as written (compressed-tensors' fake quantization, online "
        "transforms attached), on the bf16 model's block-i inputs from "
        f"{len(texts)} held-out GSM8K texts ({sum(t.shape[1] for t in texts)} tokens): "
        "||y_q - y||² / ||y||².",
        *([args.note] if args.note else []),
        "",
        "| block | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for i in range(n):
        errs = [results[k]["block_rel_err"][i] for k in labels]
        best = min(errs)
        cells = [f"**{e:.3g}**" if e == best else f"{e:.3g}" for e in errs]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    means = [sum(results[k]["block_rel_err"]) / n for k in labels]
    lines.append("| mean | " + " | ".join(f"{m:.3g}" for m in means) + " |")
    wins = {k: sum(1 for i in range(n) if results[k]["block_rel_err"][i] == min(
        results[j]["block_rel_err"][i] for j in labels)) for k in labels}  # fmt: skip
    lines.append("| blocks best | " + " | ".join(str(wins[k]) for k in labels) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    payload = {"machine": info, "note": args.note, "tokens_per_text": args.max_tokens, "rows": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
