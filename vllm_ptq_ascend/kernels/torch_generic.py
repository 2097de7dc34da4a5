"""Portable backend in plain torch: runs on any device torch runs on.

It serves every scheme exactly (int32-accumulated int8 matmuls, weights dequantized
once at load for weight-only schemes) but without fused kernels, so it is the
fallback for platforms that have no backend of their own yet, and the base the
platform backends fall back to for shapes their kernels do not take.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import (
    Int8LinearSpec,
    IntDynamicSpec,
    KernelBackend,
    W4A8Spec,
    WeightOnlySpec,
)


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

    # -- W4A8 ------------------------------------------------------------------
    def prepare_w4a8(self, layer: torch.nn.Module, spec: W4A8Spec) -> None:
        w_int = torch_ops.unpack_weight(layer, 4)  # [out, in], values in [-8, 7], int8 storage
        scale = layer.weight_scale.data.float()
        drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_shape")
        if spec.group_size == -1:
            # One scale per output channel: the int4 values held in int8 are an exact int8
            # weight, so the layer is dynamic per-channel W8A8 and runs on the int8 GEMM.
            set_param(layer, "weight", w_int)
            set_param(layer, "weight_scale", scale.reshape(-1, 1))
            layer.input_scale = layer.input_zero_point = layer.azp_adj = None
            self.prepare_int8(layer, Int8LinearSpec(True, False, True))
            layer.ptq_w4a8_deq_t = None
            return
        # Per group: see torch_ops.int8_x_dequantized_mm for why float32 is exact enough.
        groups = torch_ops.group_index(w_int.shape[1], spec.group_size, None).to(w_int.device)
        layer.ptq_w4a8_deq_t = torch_ops.dequantize(w_int, scale, None, groups, torch.float32).t()
        self.use_dynamic_per_token_input(layer)

    def use_dynamic_per_token_input(self, layer: torch.nn.Module) -> None:
        """Make :meth:`quant_act_int8` quantize this layer's input per token, symmetric."""
        layer.ptq_x_scale = layer.ptq_x_zp = None

    def w4a8_mm(self, layer, x_q, x_scale, bias, out_dtype):
        if layer.ptq_w4a8_deq_t is None:
            return self.int8_mm(layer, x_q, x_scale, None, bias, out_dtype)
        return torch_ops.int8_x_dequantized_mm(x_q, x_scale, layer.ptq_w4a8_deq_t, bias, out_dtype)

    # -- W4A4 / FlatQuant ---------------------------------------------------------
    def prepare_int_dynamic(self, layer: torch.nn.Module, spec: IntDynamicSpec) -> None:
        # Per-channel int4/int8 values held in int8 are an exact int8 weight: the int8 GEMM
        # (oneDNN on CPU) serves every weight width; only the activation grid differs.
        w_int = torch_ops.unpack_weight(layer, spec.weight_bits)  # [out, in] int8 storage
        drop_params(layer, "weight_packed", "weight_shape")
        set_param(layer, "weight", w_int)
        layer.input_scale = layer.input_zero_point = layer.azp_adj = None
        self.prepare_int8(layer, Int8LinearSpec(True, False, True))
        if spec.transform is not None:  # transform in float32 whatever the model dtype
            spec = replace(spec, transform=spec.transform.float())
        layer.ptq_dynamic_spec = spec

    def quant_act_dynamic(self, layer, x):
        spec: IntDynamicSpec = layer.ptq_dynamic_spec
        clip = 1.0
        if spec.transform is not None:
            x = torch_ops.kronecker_transform(x.float(), spec.transform.left, spec.transform.right)
            clip = spec.transform.clip_ratio
        return torch_ops.per_token_quant_clipped(x, spec.act_qmax, clip)

    def int_dynamic_mm(self, layer, x_q, x_scale, bias, out_dtype):
        return self.int8_mm(layer, x_q, x_scale, None, bias, out_dtype)

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


def set_param(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """(Re)register ``name`` as a frozen parameter holding ``tensor``."""
    if hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def drop_params(layer: torch.nn.Module, *names: str) -> None:
    """Free checkpoint-layout tensors once the backend holds its own copy (keep the attribute)."""
    for name in names:
        if getattr(layer, name, None) is not None:
            delattr(layer, name)
            setattr(layer, name, None)
