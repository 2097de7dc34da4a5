"""Portable backend in plain torch: runs on any device torch runs on.

It serves every scheme exactly (int32-accumulated int8 matmuls, weights dequantized
once at load for weight-only schemes) but without fused kernels, so it is the
fallback for platforms that have no backend of their own yet, and the base the
platform backends fall back to for shapes their kernels do not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import Int8LinearSpec, KernelBackend, WeightOnlySpec


class TorchBackend(KernelBackend):
    name = "torch"

    # -- W8A8 ----------------------------------------------------------------
    def prepare_int8(self, layer: torch.nn.Module, spec: Int8LinearSpec) -> None:
        widths = layer.logical_widths
        w_scale = layer.weight_scale.data.float()
        if not spec.weight_per_channel:  # one scale per fused shard -> one per output channel
            counts = torch.tensor(widths, device=w_scale.device)
            w_scale = torch.repeat_interleave(w_scale.reshape(-1), counts)
        # a transposed *view* of the [out, in] weight: the column-major operand cuBLASLt wants
        layer.ptq_w_t = layer.weight.data.contiguous().t()
        layer.ptq_w_scale = w_scale.reshape(-1)
        layer.ptq_x_scale = layer.ptq_x_zp = None
        if spec.static_input:
            scales = layer.input_scale.data.float()
            zps = None if spec.input_symmetric else layer.input_zero_point.data
            layer.ptq_x_scale, layer.ptq_x_zp = torch_ops.merge_static_input_ranges(scales, zps)
        drop_params(layer, "weight", "weight_scale", "input_scale", "input_zero_point")

    def quant_act_int8(self, layer, x):
        if layer.ptq_x_scale is None:
            x_q, scale = torch_ops.per_token_quant_int8(x)
            return x_q, scale, None
        x_q = torch_ops.static_quant_int8(x, layer.ptq_x_scale, layer.ptq_x_zp)
        return x_q, layer.ptq_x_scale, layer.ptq_x_zp

    def int8_mm(self, layer, x_q, x_scale, x_zp, bias, out_dtype):
        w_t, w_scale = layer.ptq_w_t, layer.ptq_w_scale
        return torch_ops.int8_mm_dequant(x_q, w_t, x_scale, w_scale, x_zp, bias, out_dtype)

    # -- W4A16 / W8A16 ---------------------------------------------------------
    def prepare_weight_only(self, layer: torch.nn.Module, spec: WeightOnlySpec) -> None:
        self.dequantize_once(layer, spec)

    def dequantize_once(self, layer: torch.nn.Module, spec: WeightOnlySpec) -> None:
        w_int = torch_ops.unpack_weight(layer, spec.num_bits)
        zp = torch_ops.unpack_zero_point(layer, spec.num_bits)
        g_idx = layer.weight_g_idx.data if spec.has_g_idx else None
        groups = torch_ops.group_index(w_int.shape[1], spec.group_size, g_idx).to(w_int.device)
        scale = layer.weight_scale.data
        layer.ptq_weight = torch_ops.dequantize(w_int, scale, zp, groups, layer.params_dtype)
        layer.ptq_fast = False
        layer.ptq_perm = None
        drop_params(layer, "weight_packed", "weight", "weight_zero_point", "weight_g_idx", "weight_scale")

    def weight_only_mm(self, layer, x, bias):
        return F.linear(x, layer.ptq_weight, bias)


def drop_params(layer: torch.nn.Module, *names: str) -> None:
    """Free checkpoint-layout tensors once the backend holds its own copy (keep the attribute)."""
    for name in names:
        if getattr(layer, name, None) is not None:
            delattr(layer, name)
            setattr(layer, name, None)
