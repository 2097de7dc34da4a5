"""Compressed-tensors checkpoints of a tiny model, one per scheme, for end-to-end tests.

Most are written by llmcompressor itself (so CI proves it works in the same
environment as vLLM); GPTQ act-order "group" checkpoints, which llmcompressor
0.14 no longer writes but older tools did, are written by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.reference import pack_int32


def _calibration(tokenizer, n=8, length=64):
    from datasets import Dataset

    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    ids = [tokenizer(t, truncation=True, max_length=length)["input_ids"] for t in reasoning_texts()[:n]]
    return Dataset.from_dict({"input_ids": ids})


def _group(weights: dict, acts: dict | None = None, fmt: str | None = None) -> dict:
    g = {"targets": ["Linear"], "weights": weights}
    if acts:
        g["input_activations"] = acts
    if fmt:
        g["format"] = fmt  # else llmcompressor infers it (int-quantized when activations are quantized)
    return {"group_0": g}


W = lambda bits, strategy, sym=True, gs=None: {  # noqa: E731
    "num_bits": bits,
    "type": "int",
    "symmetric": sym,
    "strategy": strategy,
    "group_size": gs,
}
A_STATIC = lambda sym: {
    "num_bits": 8,
    "type": "int",
    "symmetric": sym,
    "strategy": "tensor",
    "dynamic": False,
}  # noqa: E731
A_DYNAMIC_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

# name -> (config_groups, needs calibration data)
LLMCOMPRESSOR_SCHEMES = {
    "w8a8-static-sym": (_group(W(8, "channel"), A_STATIC(True)), True),
    "w8a8-static-asym": (_group(W(8, "channel"), A_STATIC(False)), True),
    "w4a16-g128-sym": (_group(W(4, "group", True, 128)), False),
    "w4a16-g64-asym": (_group(W(4, "group", False, 64)), False),
    "w4a16-channel-sym": (_group(W(4, "channel")), False),
    "w8a16-g128-sym": (_group(W(8, "group", True, 128)), False),
    # W4A8 (llmcompressor's W4A8 preset with a group size): int4 symmetric weights, int8 dynamic tokens
    "w4a8-g32-packed": (_group(W(4, "group", True, 32), A_DYNAMIC_TOKEN, "pack-quantized"), False),
    "w4a8-g64-int": (_group(W(4, "group", True, 64), A_DYNAMIC_TOKEN), False),
}


def llmcompressor_checkpoint(model_dir: Path, out: Path, name: str, scheme: tuple | None = None) -> Path:
    """llmcompressor's checkpoint of scheme ``name`` (LLMCOMPRESSOR_SCHEMES), or of ``scheme`` given as
    (config_groups, needs calibration data)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    groups, calibrate = scheme or LLMCOMPRESSOR_SCHEMES[name]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    kw = dict(dataset=_calibration(tok), num_calibration_samples=8, max_seq_length=64) if calibrate else {}
    oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head"]), **kw)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    return out


SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def act_order_checkpoint(model_dir: Path, out: Path, group_size: int = 32, seed: int = 0) -> Path:
    """W4A16 symmetric with GPTQ act-order "group": channels grouped by a permutation (g_idx)."""
    shutil.copytree(model_dir, out)
    sd = load_file(out / "model.safetensors")
    new = {}
    perms: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if not (name.endswith("proj.weight") and t.dim() == 2):
            new[name] = t
            continue
        base = name[: -len(".weight")]
        w = t.double()
        out_f, in_f = w.shape
        # GPTQ orders channels by the input's Hessian, so layers reading the same input
        # (q/k/v, gate/up) share one g_idx; one permutation per (block, input) here.
        parent, proj = base.rsplit(".", 1)
        key = f"{parent}.{SHARED_INPUT.get(proj, proj)}"
        if key not in perms:
            perms[key] = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed + len(perms)))
        g_idx = perms[key] // group_size
        scale = torch.zeros(out_f, in_f // group_size, dtype=torch.float64)
        for k in range(in_f // group_size):
            scale[:, k] = w[:, g_idx == k].abs().amax(1).clamp(min=1e-8) / 7.0
        q = torch.round(w / scale[:, g_idx]).clamp(-8, 7).to(torch.int64)
        new[f"{base}.weight_packed"] = pack_int32(q, 4, 1)
        new[f"{base}.weight_scale"] = scale.to(torch.bfloat16)
        new[f"{base}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        new[f"{base}.weight_g_idx"] = g_idx.to(torch.int32)
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    weights = W(4, "group", True, group_size) | {"actorder": "group"}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}},
        "ignore": ["lm_head"],
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
