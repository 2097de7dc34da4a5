"""Which vLLM-CPU kernel the CPU backend picks (numerics are in test_scheme_numerics.py)."""

from __future__ import annotations

import pytest
import torch

from tests.layer_helpers import build_layer, ct_config, load_tensors, make_wna16_tensors, wna16


def _wna16_built() -> bool:
    from vllm_ptq_ascend.kernels.cpu import wna16_kernel_available

    return wna16_kernel_available()


@pytest.mark.skipif(not _wna16_built(), reason="this vLLM-CPU build has no cpu_gemm_wna16 (AVX2-only host)")
def test_fast_kernels_are_used_where_they_apply(vllm_dist):
    """bf16 W4A16 at kernel-friendly shapes runs vLLM-CPU's cpu_gemm_wna16, act-order included."""
    for act_order in (False, True):
        cfg = ct_config(wna16(4, 32, True, "group" if act_order else None))
        layer = build_layer("ReplicatedLinear", cfg, 256, 128, torch.bfloat16)
        tensors = make_wna16_tensors(128, 256, 4, 32, True, act_order)
        load_tensors(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.ptq_fast
        assert (layer.ptq_perm is not None) == act_order


def test_fp32_and_irregular_g_idx_fall_back_to_exact_torch(vllm_dist):
    from tests.reference import dequant_weight

    # fp32: cpu_gemm_wna16 has no fp32 kernel
    layer = build_layer("ReplicatedLinear", ct_config(wna16(4, 32, True)), 256, 128, torch.float32)
    load_tensors(layer, make_wna16_tensors(128, 256, 4, 32, True))
    layer.quant_method.process_weights_after_loading(layer)
    assert not layer.ptq_fast

    # g_idx whose groups are not all group_size wide: no contiguous layout exists
    tensors = make_wna16_tensors(128, 256, 4, 32, True, act_order=True)
    g = torch.Generator().manual_seed(5)
    tensors["weight_g_idx"] = torch.randint(0, 8, (256,), generator=g, dtype=torch.int32)
    cfg = ct_config(wna16(4, 32, True, "group"))
    layer = build_layer("ReplicatedLinear", cfg, 256, 128, torch.bfloat16, bias=False)
    load_tensors(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    assert not layer.ptq_fast
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    out = layer(x)[0].double()
    ref = x.double() @ dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4}).t()
    assert float((out - ref).norm() / ref.norm()) < 2e-2


def test_onednn_int8_only_where_it_accumulates_exactly():
    from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact

    assert not onednn_int8_is_exact({"avx2", "fma"})  # vpmaddubsw saturates pairs in int16
    assert not onednn_int8_is_exact({"avx512f", "avx512bw"})
    assert onednn_int8_is_exact({"avx512f", "avx512_vnni"}) and onednn_int8_is_exact({"amx_int8"})


def test_full_range_int8_w8a8_is_exact_on_this_cpu(vllm_dist):
    """Full-range int8 weights against float64, whichever int8 GEMM this CPU gets."""
    from tests.layer_helpers import W8A8_DYNAMIC, make_w8a8_tensors
    from tests.reference import quant_per_token

    layer = build_layer("ReplicatedLinear", ct_config(*W8A8_DYNAMIC), 256, 128, torch.float32, bias=False)
    tensors = make_w8a8_tensors(128, 256)
    tensors["weight"][:, 0] = 127  # the largest products, where int16 pairs saturate
    load_tensors(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 50.0
    w = tensors["weight"].double() * tensors["weight_scale"].double()
    ref = quant_per_token(x.double()) @ w.t()
    err = float((layer(x)[0].double() - ref).norm() / ref.norm())
    assert err < 1e-5, err


@pytest.mark.parametrize("m,k,n", [(7, 1536, 96), (33, 4096, 64), (5, 1025, 3), (1, 1, 1)])
def test_int8_gemm_on_float32_is_exact(m, k, n):
    """The CPU's int8 GEMM without VNNI: float32 chunks of 1024 products, exact at the int8 extremes."""
    from vllm_ptq_ascend.kernels.torch_ops import int_mm_via_float32

    g = torch.Generator().manual_seed(k)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    x[0], w[:, 0] = -128, -128  # the largest products: 2^14 each, 2^24 per full chunk
    got = int_mm_via_float32(x, w)
    assert got.dtype == torch.int32 and torch.equal(got.long(), x.long() @ w.long())
