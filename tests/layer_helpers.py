"""Build quantized checkpoint tensors for one linear layer and run them through a vLLM layer."""

from __future__ import annotations

import torch

from tests.reference import pack_int32


def ct_config(weights: dict, acts: dict | None = None, fmt: str | None = None) -> dict:
    """A single-group compressed-tensors quantization_config targeting every Linear."""
    fmt = fmt or ("int-quantized" if acts else "pack-quantized")
    group = {"targets": ["Linear"], "weights": weights, "format": fmt}
    if acts:
        group["input_activations"] = acts
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": group},
        "ignore": [],
    }


W8A8_DYNAMIC = (
    {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
)


def w8a8_static(symmetric: bool, weight_strategy: str = "channel"):
    return (
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": weight_strategy},
        {"num_bits": 8, "type": "int", "symmetric": symmetric, "strategy": "tensor", "dynamic": False},
    )


def wna16(bits: int, group_size: int | None, symmetric: bool, actorder: str | None = None) -> dict:
    w = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
    }
    if actorder:
        w["actorder"] = actorder
    return w


def w4a8(group_size: int | None) -> tuple[dict, dict]:
    """llmcompressor's W4A8 preset: symmetric int4 group/channel weights, int8 per-token dynamic acts."""
    w = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
    }
    return w, dict(W8A8_DYNAMIC[1])


def make_w4a8_tensors(out_f, in_f, group_size, packed, gen=None):
    """int4 values in [-8, 7]: packed into int32 (pack-quantized) or one per int8 (int-quantized)."""
    g = gen or torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (out_f, in_f), generator=g)
    n_groups = 1 if not group_size else in_f // group_size
    t = {"weight_scale": torch.rand(out_f, n_groups, generator=g) * 0.02 + 1e-3}
    if packed:
        t["weight_packed"] = pack_int32(q, 4, 1)
        t["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    else:
        t["weight"] = q.to(torch.int8)
    return t


def make_w8a8_tensors(out_f, in_f, *, per_channel=True, static=False, symmetric=True, gen=None):
    g = gen or torch.Generator().manual_seed(0)
    t = {"weight": torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8)}
    t["weight_scale"] = torch.rand(out_f if per_channel else 1, 1, generator=g) * 0.01 + 1e-3
    if not per_channel:
        t["weight_scale"] = t["weight_scale"].reshape(1)
    if static:
        t["input_scale"] = torch.tensor([0.02])
        if not symmetric:
            t["input_zero_point"] = torch.tensor([-7], dtype=torch.int8)
    return t


def make_wna16_tensors(out_f, in_f, bits, group_size, symmetric, act_order=False, gen=None):
    g = gen or torch.Generator().manual_seed(0)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (out_f, in_f), generator=g)
    n_groups = 1 if not group_size else in_f // group_size
    t = {
        "weight_packed": pack_int32(q, bits, 1),
        "weight_scale": torch.rand(out_f, n_groups, generator=g) * 0.02 + 1e-3,
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not symmetric:
        t["weight_zero_point"] = pack_int32(torch.randint(lo, hi, (out_f, n_groups), generator=g), bits, 0)
    if act_order:
        # GPTQ act-order: each group holds group_size channels, in an arbitrary order.
        t["weight_g_idx"] = (torch.randperm(in_f, generator=g) // group_size).to(torch.int32)
    return t


def build_layer(
    kind, config_dict, in_f, out_f, dtype, prefix="model.layers.0.mlp.down_proj", bias=True, **kw
):
    """A vLLM linear layer (ReplicatedLinear / Column / Row / MergedColumn) under ptq_ascend."""
    from vllm.model_executor.layers import linear
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    cfg = PtqAscendConfig.from_config(config_dict)
    if "packed_modules_mapping" in kw:  # what vLLM sets from the model class
        cfg.packed_modules_mapping = kw["packed_modules_mapping"]
    cls = getattr(linear, kind)
    with set_default_torch_dtype(dtype):
        if kind == "MergedColumnParallelLinear":
            layer = cls(in_f, kw["output_sizes"], bias=bias, quant_config=cfg, prefix=prefix)
        else:
            layer = cls(in_f, out_f, bias=bias, quant_config=cfg, prefix=prefix)
    return layer


def load_tensors(layer, tensors: dict, shard_id=None):
    for name, value in tensors.items():
        param = getattr(layer, name)
        if shard_id is None:
            param.weight_loader(param, value)
        else:
            param.weight_loader(param, value, shard_id)
