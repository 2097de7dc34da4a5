"""Portable kernels in plain torch: they run on any device torch runs on.

They serve every layer exactly (int32-accumulated int8 matmuls, weights dequantized once at load
for weight-only layers) but without fused kernels, so each is the last candidate of its family on
every platform, and the whole list where a platform has no kernels of its own yet.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import (
    Int8Kernel,
    Int8LinearSpec,
    IntDynamicKernel,
    LinearKernel,
    W4A8Spec,
    WeightOnlySpec,
)


class _Portable:
    """Takes any layer of its family; choosing it means no platform kernel could."""

    @classmethod
    def can_implement(cls, config):
        return True, None

    @classmethod
    def fallback(cls, config):
        return True


class TorchInt8Kernel(_Portable, Int8Kernel):
    """int8 x int8 with int32 accumulation (torch._int_mm where it is exact), dequantized in float32."""

    def process_weights_after_loading(self, layer):
        spec: Int8LinearSpec = self.spec
        w_scale = layer.weight_scale.data.float()
        if not spec.weight_per_channel:  # one scale per fused shard -> one per output channel
            counts = torch.tensor(self.config.shape.output_partition_sizes, device=w_scale.device)
            w_scale = torch.repeat_interleave(w_scale.reshape(-1), counts)
        # a transposed *view* of the [out, in] weight: the column-major operand cuBLASLt wants
        self.w_t = layer.weight.data.contiguous().t()
        self.w_scale = w_scale.reshape(-1)
        self.x_scale = self.x_zp = None
        if spec.static_input:
            scales = layer.input_scale.data.float()
            zps = None if spec.input_symmetric else layer.input_zero_point.data
            self.x_scale, self.x_zp = torch_ops.merge_static_input_ranges(scales, zps)
        drop_params(layer, "weight", "weight_scale", "input_scale", "input_zero_point")

    def quantize_input(self, x):
        if self.x_scale is None:
            x_q, scale = torch_ops.per_token_quant_int8(x)
            return x_q, scale, None
        return torch_ops.static_quant_int8(x, self.x_scale, self.x_zp), self.x_scale, self.x_zp

    def mm(self, x_q, x_scale, x_zp, bias, out_dtype):
        return torch_ops.int8_mm_dequant(x_q, self.w_t, x_scale, self.w_scale, x_zp, bias, out_dtype)


class TorchW4A8Kernel(_Portable, LinearKernel):
    """int8 per-token activations x int4 weights dequantized once to float32 (see
    ``torch_ops.int8_x_dequantized_mm`` for why float32 is exact enough); any group size."""

    family = W4A8Spec

    def process_weights_after_loading(self, layer):
        w_int = torch_ops.unpack_weight(layer, 4)  # [out, in], values in [-8, 7], int8 storage
        scale = layer.weight_scale.data.float()
        groups = torch_ops.group_index(w_int.shape[1], self.spec.group_size, None).to(w_int.device)
        self.w_deq_t = torch_ops.dequantize(w_int, scale, None, groups, torch.float32).t()
        drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_shape")

    def apply(self, layer, x, bias):
        x_q, x_scale = torch_ops.per_token_quant_int8(x)
        return torch_ops.int8_x_dequantized_mm(x_q, x_scale, self.w_deq_t, bias, x.dtype)


class TorchIntDynamicKernel(_Portable, IntDynamicKernel):
    """The transform (float32), clipping and per-token quantization in torch, then the platform's
    int8 GEMM on the int weights held one per int8 (exact for 4- and 8-bit values alike)."""

    def process_weights_after_loading(self, layer):
        from vllm_ptq_ascend import kernels  # the platform's int8 GEMM (lazy: the package chooses)

        int8_weight_per_channel(layer, self.spec.weight_bits)
        inner = replace(self.config, spec=Int8LinearSpec(True, False, True, quantized_input=True))
        self.gemm: Int8Kernel = kernels.choose_kernel(inner)
        self.gemm.process_weights_after_loading(layer)
        self.factors = None if self.transform is None else self.transform.float()
        self.right = None if self.factors is None else self.factors.right_or_none()

    @classmethod
    def fallback(cls, config):
        return config.spec.act_bits == 4  # 8-bit activations have no fused transform kernel anywhere

    @property
    def name(self) -> str:
        gemm = getattr(self, "gemm", None)
        return f"{type(self).__name__}({gemm.name})" if gemm is not None else type(self).__name__

    def quantize_input(self, x):
        clip = 1.0
        if self.factors is not None:  # transform in float32 whatever the model dtype
            x = torch_ops.kronecker_transform(x.float(), self.factors.left, self.right)
            clip = self.factors.clip_ratio
        return torch_ops.per_token_quant_clipped(x, self.spec.act_qmax, clip)

    def mm(self, x_q, x_scale, bias, out_dtype):
        return self.gemm.mm(x_q, x_scale.reshape(-1).float(), None, bias, out_dtype)


class TorchWeightOnlyKernel(_Portable, LinearKernel):
    """The weight dequantized once at load (any bits, groups, zero points, act-order), then F.linear."""

    family = WeightOnlySpec

    def process_weights_after_loading(self, layer):
        spec: WeightOnlySpec = self.spec
        w_int = torch_ops.unpack_weight(layer, spec.num_bits)
        zp = torch_ops.unpack_zero_point(layer, spec.num_bits)
        g_idx = layer.weight_g_idx.data if spec.has_g_idx else None
        groups = torch_ops.group_index(w_int.shape[1], spec.group_size, g_idx).to(w_int.device)
        scale = layer.weight_scale.data
        self.weight = torch_ops.dequantize(w_int, scale, zp, groups, self.config.params_dtype)
        drop_params(layer, "weight_packed", "weight", "weight_zero_point", "weight_g_idx", "weight_scale")

    def apply(self, layer, x, bias):
        return F.linear(x, self.weight, bias)


def int8_weight_per_channel(layer: torch.nn.Module, bits: int) -> None:
    """Per-channel int weights of any width as an int8 ``weight`` [out, in] with ``weight_scale``
    [out, 1] and no input scales: the layout of a dynamic per-channel W8A8 layer."""
    w_int = torch_ops.unpack_weight(layer, bits)
    scale = layer.weight_scale.data.float().reshape(-1, 1)
    drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_shape")
    set_param(layer, "weight", w_int)
    set_param(layer, "weight_scale", scale)
    layer.input_scale = layer.input_zero_point = layer.azp_adj = None


def set_param(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """(Re)register ``name`` as a frozen parameter holding ``tensor``."""
    if hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def drop_params(layer: torch.nn.Module, *names: str) -> None:
    """Free checkpoint-layout tensors once the kernel holds its own copy (keep the attribute)."""
    for name in names:
        if getattr(layer, name, None) is not None:
            delattr(layer, name)
            setattr(layer, name, None)
