"""Which kernel each layer gets (kernels/__init__.py's candidate lists), on real vLLM layers.

The CPU lists run vLLM-CPU's own kernels where they give the checkpoint's numbers; the lists of
CUDA, ROCm and XPU ask vLLM's own selection (``choose_scaled_mm_linear_kernel``,
``choose_mp_linear_kernel``), which on this CPU host answers with vLLM's CPU kernels: the same
adapters, run here on vLLM's real code. Numerics of every scheme on every list are in
tests/schemes/test_scheme_numerics.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.layer_helpers import (
    W8A8_DYNAMIC,
    build_layer,
    ct_config,
    load_tensors,
    make_w4a8_tensors,
    make_w8a8_tensors,
    make_wna16_tensors,
    w4a8,
    w8a8_static,
    wna16,
)
from tests.reference import dequant_weight, quant_per_token
from vllm_ptq_ascend.kernels import (
    BACKEND_ENV,
    KernelConfig,
    LayerShape,
    WeightOnlySpec,
    choose_kernel,
    first_candidate,
)


def _wna16_built() -> bool:
    from vllm_ptq_ascend.kernels.cpu import wna16_kernel_available

    return wna16_kernel_available()


def _amx_int8() -> bool:
    """vLLM-CPU's AMX int8 kernel applies here (at these tests' shapes)."""
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    return check_cpu_sgl_kernel(128, 256, torch.int8)


AMX_INT8 = "CpuAmxInt8Kernel(CPUInt8ScaledMMLinearKernel)"
needs_wna16 = pytest.mark.skipif(
    not _wna16_built(), reason="this vLLM-CPU build has no cpu_gemm_wna16 (AVX2-only host)"
)


def _large_w4a16() -> str:
    """The kernel bf16 W4A16 calls past the int4 GEMV get on this CPU: vLLM's cpu_gemm_wna16 where it
    runs its AMX path, else the dequantizing one (tests/kernels/test_cpu_dequant.py tests both)."""
    from vllm_ptq_ascend.cpu_features import request_amx_tiles

    amx = torch.cpu._is_amx_tile_supported() and request_amx_tiles()
    return "CpuWna16Kernel" if amx else "CpuWna16PrefillKernel"


def _layer(monkeypatch, platform, cfg, tensors, in_f, out_f, dtype, bias=False):
    monkeypatch.setenv(BACKEND_ENV, platform)
    layer = build_layer("ReplicatedLinear", cfg, in_f, out_f, dtype, bias=bias)
    load_tensors(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _rel(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@needs_wna16
@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_w4a16_runs_on_vllms_cpu_wna16_kernel(monkeypatch, vllm_dist, platform):
    """bf16 W4A16 at kernel-friendly shapes: vLLM's CPUWNA16LinearKernel, act-order permuted first."""
    name = "VllmMixedPrecisionKernel(CPUWNA16LinearKernel)"
    if platform == "cpu":  # torch's int4 kernel for a few tokens, vLLM's above
        name = f"CpuInt4GemvKernel(large: {_large_w4a16()}(CPUWNA16LinearKernel))"
    for act_order in (False, True):
        cfg = ct_config(wna16(4, 32, True, "group" if act_order else None))
        tensors = make_wna16_tensors(128, 256, 4, 32, True, act_order)
        layer = _layer(monkeypatch, platform, cfg, tensors, 256, 128, torch.bfloat16)
        assert layer.scheme.kernel.name == (f"ActOrderKernel({name})" if act_order else name)
        w = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
        for m in (1, 4, 9, 40):  # both sides of the CPU's token crossover
            x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            assert _rel(layer(x)[0], x.double() @ w.t()) < 2e-2


def test_fp32_and_irregular_g_idx_fall_back_to_exact_torch(monkeypatch, vllm_dist):
    # fp32: cpu_gemm_wna16 has no fp32 kernel
    layer = _layer(
        monkeypatch,
        "cpu",
        ct_config(wna16(4, 32, True)),
        make_wna16_tensors(128, 256, 4, 32, True),
        256,
        128,
        torch.float32,
    )
    assert layer.scheme.kernel.name == "CpuInt4GemvKernel(large: CpuDequantizedKernel)"

    # g_idx whose groups are not all group_size wide: no contiguous layout exists
    tensors = make_wna16_tensors(128, 256, 4, 32, True, act_order=True)
    g = torch.Generator().manual_seed(5)
    tensors["weight_g_idx"] = torch.randint(0, 8, (256,), generator=g, dtype=torch.int32)
    cfg = ct_config(wna16(4, 32, True, "group"))
    layer = _layer(monkeypatch, "cpu", cfg, tensors, 256, 128, torch.bfloat16)
    assert layer.scheme.kernel.name == "ActOrderKernel(TorchWeightOnlyKernel)"
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    ref = x.double() @ dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4}).t()
    assert _rel(layer(x)[0], ref) < 2e-2


@pytest.mark.parametrize("exact", [True, False], ids=["onednn-exact", "onednn-saturates"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-asym"])
def test_w8a8_on_cpu_takes_onednn_only_where_it_is_exact(monkeypatch, vllm_dist, exact, static):
    """Dynamic bf16 layers on AMX CPUs: vLLM's own AMX kernel. Otherwise oneDNN (vLLM's
    CPUInt8ScaledMMLinearKernel's layout, its oneDNN path even with AMX, where vLLM's own would ignore
    static scales) where this CPU accumulates int8 exactly, torch elsewhere."""
    from tests.reference import quant_static
    from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact
    from vllm_ptq_ascend.kernels.cpu import CpuOneDnnInt8Kernel

    if exact and not onednn_int8_is_exact():
        pytest.skip("this CPU's oneDNN int8 GEMM saturates (no AVX512-VNNI or AMX)")
    monkeypatch.setattr(CpuOneDnnInt8Kernel, "exact", exact)
    cfg = ct_config(*w8a8_static(False)) if static else ct_config(*W8A8_DYNAMIC)
    tensors = make_w8a8_tensors(128, 256, static=static, symmetric=not static)
    tensors["weight"][:, 0] = 127  # the largest products, where int16 pairs saturate
    layer = _layer(monkeypatch, "cpu", cfg, tensors, 256, 128, torch.bfloat16)
    expect = "CpuOneDnnInt8Kernel" if exact else "TorchInt8Kernel"
    assert layer.scheme.kernel.name == (AMX_INT8 if not static and _amx_int8() else expect)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 5.0
    x = x.to(torch.bfloat16)
    w = tensors["weight"].double() * tensors["weight_scale"].double()
    if static:
        xq = quant_static(x.double(), tensors["input_scale"].double(), tensors["input_zero_point"].double())
    else:
        xq = quant_per_token(x.double())
    assert _rel(layer(x)[0], xq @ w.t()) < 1e-2


needs_amx_int8 = pytest.mark.skipif(not _amx_int8(), reason="no AMX int8 on this CPU")


@needs_amx_int8
def test_vllms_amx_int8_packer_still_refuses_what_its_check_admits(vllm_dist):
    """Pins the upstream bug CpuAmxInt8Kernel steps around: check_cpu_sgl_kernel admits N=48, and
    convert_weight_packed refuses it. When vLLM fixes one of them, relax AMX_INT8_BLOCK_N."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    assert check_cpu_sgl_kernel(48, 256, torch.int8)
    with pytest.raises(RuntimeError, match="BLOCK_N"):
        torch.ops._C.convert_weight_packed(torch.zeros(48, 256, dtype=torch.int8))


@needs_amx_int8
def test_dynamic_w8a8_whose_rows_are_not_a_whole_amx_block_stays_on_onednn(monkeypatch, vllm_dist):
    from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact

    tensors = make_w8a8_tensors(48, 256)
    layer = _layer(monkeypatch, "cpu", ct_config(*W8A8_DYNAMIC), tensors, 256, 48, torch.bfloat16)
    expect = "CpuOneDnnInt8Kernel" if onednn_int8_is_exact() else "TorchInt8Kernel"
    assert layer.scheme.kernel.name == expect
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref = quant_per_token(x.double()) @ (tensors["weight"].double() * tensors["weight_scale"].double()).t()
    assert _rel(layer(x)[0], ref) < 1e-2


def test_w8a8_on_the_cuda_list_runs_vllms_own_selection(monkeypatch, vllm_dist):
    """The CUDA/ROCm/XPU candidate asks vLLM's init_int8 selection; on this host vLLM answers with
    its CPU kernel, which then serves the layer exactly as vLLM's own compressed-tensors scheme."""
    tensors = make_w8a8_tensors(128, 256)
    layer = _layer(monkeypatch, "cuda", ct_config(*W8A8_DYNAMIC), tensors, 256, 128, torch.bfloat16)
    assert layer.scheme.kernel.name == "VllmInt8Kernel(CPUInt8ScaledMMLinearKernel)"
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = quant_per_token(x.double()) @ (tensors["weight"].double() * tensors["weight_scale"].double()).t()
    assert _rel(layer(x)[0], ref) < 1e-2


@pytest.mark.parametrize(
    "platform,group,expect",
    [
        ("cpu", None, "PerChannelW4A8AsInt8Kernel(CpuOneDnnInt8Kernel)"),
        (
            "cpu",
            32,
            "CpuW4A8OnInt8GridKernel(CpuInt4GemvKernel(large: LARGE_W4A16(CPUWNA16LinearKernel)))",
        ),
        ("cuda", None, "PerChannelW4A8AsInt8Kernel(VllmInt8Kernel(CPUInt8ScaledMMLinearKernel))"),
        ("torch", None, "PerChannelW4A8AsInt8Kernel(TorchInt8Kernel)"),
    ],
)
def test_w4a8_per_channel_runs_on_the_platforms_int8_gemm(monkeypatch, vllm_dist, platform, group, expect):
    from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact

    expect = expect.replace("LARGE_W4A16", _large_w4a16())
    if "CpuOneDnn" in expect and _amx_int8():
        expect = expect.replace("CpuOneDnnInt8Kernel", AMX_INT8)
    elif "CpuOneDnn" in expect and not onednn_int8_is_exact():
        expect = expect.replace("CpuOneDnnInt8Kernel", "TorchInt8Kernel")
    if "CpuWna16" in expect and not _wna16_built():
        expect = "CpuW4A8OnInt8GridKernel(CpuInt4GemvKernel(large: CpuDequantizedKernel))"
    tensors = make_w4a8_tensors(128, 256, group, packed=False)
    layer = _layer(monkeypatch, platform, ct_config(*w4a8(group)), tensors, 256, 128, torch.bfloat16)
    assert layer.scheme.kernel.name == expect


def test_vllms_disabled_kernels_setting_applies_to_ours(monkeypatch, vllm_dist):
    """VLLM_DISABLED_KERNELS, vLLM's own switch, passes over our kernels as it does vLLM's."""
    tensors = make_w4a8_tensors(128, 256, 32, packed=False)
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "CpuW4A8OnInt8GridKernel")
    layer = _layer(monkeypatch, "cpu", ct_config(*w4a8(32)), tensors, 256, 128, torch.bfloat16)
    assert layer.scheme.kernel.name == "TorchW4A8Kernel"


def test_reasons_name_every_candidate_passed_over():
    shape = LayerShape(256, 128, 256, (128,), torch.float32)
    config = KernelConfig(WeightOnlySpec(8, -1, True, False), shape, "model.layers.0.mlp.down_proj", "cpu")
    chosen, reasons = first_candidate(config)
    assert chosen.__name__ == "CpuInt8WeightKernel"
    assert reasons == [
        "ActOrderKernel: no act-order g_idx",
        "CpuInt4GemvKernel: 8-bit weights (the int4 kernel takes 4-bit ones)",
        "CpuWna16PrefillKernel: 8-bit weights (it reads vLLM-CPU's 4-bit layout)",
        "CpuWna16Kernel: cpu_gemm_wna16 has no torch.float32 kernel",
    ]


def test_no_kernel_is_an_error_listing_every_reason(monkeypatch):
    from vllm_ptq_ascend.kernels import composed, torch_generic

    monkeypatch.setattr(
        torch_generic.TorchWeightOnlyKernel, "can_implement", classmethod(lambda c, cfg: (0, "x"))
    )
    shape = LayerShape(256, 128, 256, (128,), torch.float32)
    config = KernelConfig(WeightOnlySpec(4, 32, True, False), shape, "model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError) as err:
        choose_kernel(config, platform="torch")
    msg = str(err.value)
    assert "model.layers.0.mlp.down_proj" in msg and "no torch kernel" in msg
    assert "ActOrderKernel: no act-order g_idx" in msg and "TorchWeightOnlyKernel: x" in msg
    assert composed.ActOrderKernel.can_implement(config) == (False, "no act-order g_idx")


def test_onednn_int8_only_where_it_accumulates_exactly():
    from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact

    assert not onednn_int8_is_exact({"avx2", "fma"})  # vpmaddubsw saturates pairs in int16
    assert not onednn_int8_is_exact({"avx512f", "avx512bw"})
    assert onednn_int8_is_exact({"avx512f", "avx512_vnni"}) and onednn_int8_is_exact({"amx_int8"})


def test_full_range_int8_w8a8_is_exact_on_this_cpu(vllm_dist):
    """Full-range int8 weights against float64, whichever int8 GEMM this CPU gets."""
    layer = build_layer("ReplicatedLinear", ct_config(*W8A8_DYNAMIC), 256, 128, torch.float32, bias=False)
    tensors = make_w8a8_tensors(128, 256)
    tensors["weight"][:, 0] = 127  # the largest products, where int16 pairs saturate
    load_tensors(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    # never vLLM's AMX int8 kernel in float32: it takes bf16/fp16 activations only (cpu_features.py)
    assert not layer.scheme.kernel.name.startswith("CpuAmxInt8Kernel")
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
