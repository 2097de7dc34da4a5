"""Portable torch building blocks shared by backends (unpacking, dequantization, fallbacks).

These are the slow-but-exact paths: any backend may fall back to them for shapes
or bit-widths its fast kernels do not cover.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from vllm_ptq_ascend.formats.kronecker import kronecker_transform  # noqa: F401 (backends call it here)

INT8_MIN, INT8_MAX = -128, 127


def unpack_weight(layer: torch.nn.Module, num_bits: int) -> torch.Tensor:
    """Signed integer weight [out, in] (int8 storage) from the layer's checkpoint tensors."""
    if hasattr(layer, "weight_packed") and layer.weight_packed is not None:
        out_features = layer.weight_packed.shape[0]
        shape = torch.Size((out_features, layer.input_size_per_partition))
        return unpack_from_int32(layer.weight_packed.data, num_bits, shape, packed_dim=1)
    return layer.weight.data.to(torch.int8)


def unpack_zero_point(layer: torch.nn.Module, num_bits: int) -> torch.Tensor | None:
    """Signed zero points [out, groups] (packed along the output dim in the checkpoint)."""
    zp = getattr(layer, "weight_zero_point", None)
    if zp is None:
        return None
    out_features = layer.output_size_per_partition
    if zp.shape[0] != out_features:  # packed along the output dim (pack-quantized format)
        shape = torch.Size((out_features, zp.shape[1]))
        return unpack_from_int32(zp.data, num_bits, shape, packed_dim=0)
    return zp.data.to(torch.int8)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Group of every input channel: g_idx when act-order is used, else position // group_size."""
    if g_idx is not None:
        return g_idx.to(torch.long)
    if group_size <= 0:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


def dequantize(
    w_int: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    groups: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(w - zp) * scale, per input-channel group, computed in float32 and cast to ``dtype``."""
    s = scale.float()[:, groups]
    w = w_int.float()
    if zero_point is not None:
        w = w - zero_point.float()[:, groups]
    return (w * s).to(dtype)


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization: (x_q, scale [M, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-10)
    scale = amax / INT8_MAX
    x_q = torch.round(x.float() / scale).clamp(INT8_MIN, INT8_MAX).to(torch.int8)
    return x_q, scale


def per_token_quant_clipped(
    x: torch.Tensor, qmax: int, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization to [-qmax-1, qmax] (int8 storage) with the range clipped
    to ``clip_ratio`` of each row's max: (x_q, scale [M, 1]) (FlatQuant's activation quantizer)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-10)
    scale = amax * clip_ratio / qmax
    x_q = torch.round(x.float() / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return x_q, scale


def static_quant_int8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Per-tensor int8 quantization with the checkpoint's scale (and zero point)."""
    q = torch.round(x.float() / scale.float())
    if zero_point is not None:
        q = q + zero_point.float()
    return q.clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def merge_static_input_ranges(
    scales: torch.Tensor, zero_points: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One per-tensor (scale, zero point) covering every fused shard's calibrated range.

    Shards of a fused layer read the same input, so their ranges agree in practice;
    taking the union keeps the result exact when they do and safe when they do not
    (the same rule as vLLM's oneDNN path).
    """
    if zero_points is None:
        return scales.max(), None
    zps = zero_points.to(torch.int32).float()
    hi = (scales * (INT8_MAX - zps)).max()
    lo = (scales * (INT8_MIN - zps)).min()
    scale = (hi - lo) / (INT8_MAX - INT8_MIN)
    return scale, torch.round(INT8_MIN - lo / scale).to(torch.int32)


def int8_mm_dequant(
    x_q: torch.Tensor,
    w_q_t: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    x_zp: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """s_x * s_w * ((x_q - zp_x) @ w_q_t) + bias, with an exact int32 accumulator."""
    acc = _int_mm(x_q.contiguous(), w_q_t)
    if x_zp is not None:
        acc = acc - x_zp.to(torch.int32) * w_q_t.to(torch.int32).sum(dim=0, keepdim=True)
    out = acc.float() * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_x_dequantized_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """s_x * (x_q @ w_t) + bias in float32; ``w_t`` [in, out] is the weight dequantized once.

    For per-group int4 weights (W4A8) an int32 accumulator would need one GEMM per group.
    One float32 GEMM is as good: x_q is an int8 and q * s_w (|q| <= 8) is exact in float32
    whenever the scale has at most 21 significant bits (bf16/fp16 scales), and within
    2^-24 relative otherwise; so every product is exact or rounded once, and the only
    other error is float32 summation, the same as any float32 GEMM and far below the
    int8 activation grid (2^-8 relative). The cost: the weight is held as float32.
    """
    out = (x_q.float() @ w_t) * x_scale.float().reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# every integer of magnitude <= 2^24 is a float32, and |sum of 1024 int8 products| <= 128·128·1024 = 2^24
EXACT_FLOAT32_K = 1024


def int_mm_via_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32, exactly, on float32 GEMMs of at most 1024 products per output.

    Each product and every partial sum of a chunk is an integer of magnitude <= 2^24, so float32
    holds them exactly in any summation order; chunks are added in int32. On a CPU this is about
    35x faster than torch._int_mm (measured on the 2-core AVX2 CI host: 2048x576 @ 576x1536 in
    0.17 s against 6.2 s), and it is what CPUs without VNNI run (kernels/cpu.py)."""
    k = a.shape[1]
    out = None
    for start in range(0, k, EXACT_FLOAT32_K):
        part = a[:, start : start + EXACT_FLOAT32_K].float() @ b[start : start + EXACT_FLOAT32_K].float()
        part = part.to(torch.int32)
        out = part if out is None else out + part
    if out is None:
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    return out


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32.

    On CUDA, torch._int_mm (cuBLASLt) wants M > 16, K and N multiples of 8, and ``b``
    column-major, i.e. the transposed view of a contiguous [N, K] weight.
    """
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cpu":
        return int_mm_via_float32(a, b)
    if k % 8 == 0 and n % 8 == 0:
        if m > 16:
            return torch._int_mm(a, b)
        padded = torch.zeros(32, k, dtype=a.dtype, device=a.device)  # decode-sized M: pad rows
        padded[:m] = a
        return torch._int_mm(padded, b)[:m]
    # exact in float64: |sum| <= 128 * 128 * K stays far below 2^53
    return (a.double() @ b.double()).to(torch.int32)
