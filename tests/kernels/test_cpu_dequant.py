"""CpuWna16PrefillKernel: W4A16 calls with many tokens dequantize vLLM-CPU's own packed weight and run
one GEMM; fewer stay on vLLM's cpu_gemm_wna16. The weight it reads is the one vLLM's real
``CPUWNA16LinearKernel`` repacked, on real vLLM layers; references are float64."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_kernel_selection import _layer, _rel, needs_wna16
from tests.layer_helpers import ct_config, make_wna16_tensors, wna16
from tests.reference import dequant_weight
from vllm_ptq_ascend.kernels import KernelConfig, LayerShape, WeightOnlySpec, cpu_dequant

PREFILL = "CpuWna16PrefillKernel(CPUWNA16LinearKernel)"
WNA16_RUNS_AMX = cpu_dequant.wna16_runs_amx  # the host's answer, before the fixture below replaces it


@pytest.fixture(autouse=True)
def no_wna16_amx(monkeypatch):
    """These tests are of the dequantizing kernel, which steps aside where cpu_gemm_wna16 runs its AMX
    path (tested at the end): here it is taken on every CPU, AMX hosts included."""
    monkeypatch.setattr(cpu_dequant, "wna16_runs_amx", lambda config: False)


@pytest.fixture
def vllm_layout(monkeypatch):
    """vLLM's repacking is Python (CPUWNA16LinearKernel.process_weights_after_loading): it runs on a CPU
    whose vLLM build lacks the cpu_gemm_wna16 op too (the AVX2 CI host), so the dequantized path, which
    never calls that op, is tested there as well; short calls need the op (``needs_wna16``)."""
    from vllm_ptq_ascend.kernels import cpu

    monkeypatch.setattr(cpu, "wna16_kernel_available", lambda: True)


def _w4a16(monkeypatch, out_f, in_f, group, symmetric=True, seed=0):
    tensors = make_wna16_tensors(out_f, in_f, 4, group, symmetric, gen=torch.Generator().manual_seed(seed))
    layer = _layer(
        monkeypatch, "cpu", ct_config(wna16(4, group, symmetric)), tensors, in_f, out_f, torch.bfloat16
    )
    return layer, dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})


@pytest.mark.parametrize("out_f,in_f,group", [(128, 256, 32), (96, 512, 64), (64, 192, None)])
def test_dequantized_weight_is_the_checkpoints_exactly(
    monkeypatch, vllm_dist, vllm_layout, out_f, in_f, group
):
    """Read from vLLM's repacked nibbles: every weight is q·s with the scale as the layer holds it
    (bf16), rounded once to bf16 (exact: q·s needs no more bits than float32 carries)."""
    tensors = make_wna16_tensors(out_f, in_f, 4, group, True, gen=torch.Generator().manual_seed(0))
    layer, _ = _w4a16(monkeypatch, out_f, in_f, group)
    tensors["weight_scale"] = tensors["weight_scale"].to(torch.bfloat16)
    w64 = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
    kernel = layer.scheme.kernel  # per channel: torch's int4 kernel takes groups of 32-256 only
    assert kernel.name == (PREFILL if group is None else f"CpuInt4GemvKernel(large: {PREFILL})")
    kernel = getattr(kernel, "large", kernel)
    assert kernel.tile_rows == out_f  # a small weight: whole
    assert kernel.tile_rows == out_f  # a small weight: whole
    for tile in (32, 64, out_f):  # several tiles, a last partial one, a single one
        bounds = [(n0, min(out_f, n0 + tile)) for n0 in range(0, out_f, tile)]
        w_t = torch.cat([kernel.tile_t(n0, n1).clone() for n0, n1 in bounds], dim=1)
        assert w_t.shape == (in_f, out_f) and w_t.dtype == torch.bfloat16
        assert torch.equal(w_t.t(), w64.to(torch.bfloat16)), tile


@needs_wna16
def test_calls_on_both_sides_of_the_crossover_match_float64(monkeypatch, vllm_dist):
    """From the layer's crossover the dequantized path, below it cpu_gemm_wna16: both against the
    float64 product, and the long call one GEMM on the weight as held."""
    layer, w64 = _w4a16(monkeypatch, 128, 256, 64)
    tensors = make_wna16_tensors(128, 256, 4, 64, True, gen=torch.Generator().manual_seed(0))
    tensors["weight_scale"] = tensors["weight_scale"].to(torch.bfloat16)  # as the layer holds it
    w_held = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
    big = layer.scheme.kernel.large
    calls = []
    monkeypatch.setattr(big, "tile_t", lambda n0, n1, f=big.tile_t: calls.append((n0, n1)) or f(n0, n1))
    monkeypatch.setattr(big, "tile_rows", 48)  # tiles 0:48, 48:96, 96:128
    assert big.min_tokens == cpu_dequant.DEQUANT_MIN_TOKENS
    for m in (1, 9, big.min_tokens - 1, big.min_tokens, 700):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        out = layer(x)[0]
        assert out.dtype == torch.bfloat16 and out.shape == (m, 128)
        assert _rel(out, x.double() @ w64.t()) < 2e-2, m
        if m >= big.min_tokens:
            # one GEMM on the held weight: only the bf16 output rounding (2^-9) left
            assert _rel(out, x.double() @ w_held.t()) < 4e-3
    assert calls == [(0, 48), (48, 96), (96, 128)] * 2  # the two long calls only


def test_only_weights_no_cache_holds_are_tiled():
    assert cpu_dequant.tile_rows(3072, 576) == 3072  # SmolLM2's gate_up: whole
    assert cpu_dequant.tile_rows(4096, 4096) == cpu_dequant.TILE_ROWS == 512


def test_layers_share_one_scratch_buffer_and_stay_right_interleaved(monkeypatch, vllm_dist, vllm_layout):
    a, wa = _w4a16(monkeypatch, 128, 256, 32, seed=1)
    b, wb = _w4a16(monkeypatch, 64, 512, 64, seed=2)
    ka, kb = a.scheme.kernel.large, b.scheme.kernel.large
    assert ka.tile_t(0, 64).data_ptr() == kb.tile_t(0, 64).data_ptr()
    m = max(ka.min_tokens, kb.min_tokens)
    xa = torch.randn(m, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    xb = torch.randn(m, 512, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for _ in range(2):
        assert _rel(a(xa)[0], xa.double() @ wa.t()) < 2e-2
        assert _rel(b(xb)[0], xb.double() @ wb.t()) < 2e-2


def test_w4a8_per_group_long_calls_take_it_too(monkeypatch, vllm_dist, vllm_layout):
    """Per-group W4A8 on CPU runs the W4A16 kernels on int8-grid activations: long calls dequantize."""
    from tests.layer_helpers import make_w4a8_tensors, w4a8
    from tests.reference import quant_per_token

    tensors = make_w4a8_tensors(128, 256, 64, packed=False)
    layer = _layer(monkeypatch, "cpu", ct_config(*w4a8(64)), tensors, 256, 128, torch.bfloat16)
    assert layer.scheme.kernel.name == f"CpuW4A8OnInt8GridKernel(CpuInt4GemvKernel(large: {PREFILL}))"
    w64 = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
    x = torch.randn(cpu_dequant.DEQUANT_MIN_TOKENS, 256, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    assert _rel(layer(x)[0], quant_per_token(x.double(), 8) @ w64.t()) < 2e-2


def test_what_it_refuses_goes_to_the_next_kernel(monkeypatch, vllm_dist, vllm_layout):
    layer, _ = _w4a16(monkeypatch, 128, 256, 32, symmetric=False)
    assert layer.scheme.kernel.name == "CpuInt4GemvKernel(large: CpuWna16Kernel(CPUWNA16LinearKernel))"
    shape = LayerShape(256, 128, 256, (128,), torch.bfloat16)
    config = KernelConfig(WeightOnlySpec(4, 32, False, False), shape, "model.layers.0.mlp.down_proj", "cpu")
    assert cpu_dequant.CpuWna16PrefillKernel.can_implement(config) == (
        False,
        "asymmetric weights (it expands symmetric uint4b8 nibbles)",
    )
    # vLLM-CPU's own condition for its other (W4A8) packing of the same weight
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    symmetric = KernelConfig(WeightOnlySpec(4, 32, True, False), shape, "model.layers.0.mlp.down_proj", "cpu")
    ok, why = cpu_dequant.CpuWna16PrefillKernel.can_implement(symmetric)
    assert not ok and "VLLM_CPU_INT4_W4A8" in why


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_w8a16_per_channel_keeps_int8_weights_and_matches_float64(monkeypatch, vllm_dist, dtype, tol):
    """torch's int8 kernel up to INT8_GEMV_MAX_TOKENS tokens, dequantized per call above (in tiles of
    48 rows: 0:48, 48:96, 96:128): no float copy of the weight is kept."""
    tensors = make_wna16_tensors(128, 256, 8, None, True, gen=torch.Generator().manual_seed(0))
    bias = torch.randn(128, generator=torch.Generator().manual_seed(1)).to(dtype)
    cfg = ct_config(wna16(8, None, True))
    layer = _layer(monkeypatch, "cpu", cfg, {**tensors, "bias": bias}, 256, 128, dtype, bias=True)
    kernel = layer.scheme.kernel
    assert kernel.name == "CpuInt8WeightKernel"
    monkeypatch.setattr(kernel, "tile_rows", 48)
    assert kernel.weight.dtype == torch.int8 and kernel.weight.shape == (128, 256)
    floats = [n for n, t in [*layer.named_parameters(), *vars(kernel).items()] if _is_float_matrix(t)]
    assert floats == [], floats
    w64 = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 8})
    for m in (1, cpu_dequant.INT8_GEMV_MAX_TOKENS, cpu_dequant.INT8_GEMV_MAX_TOKENS + 1, 300):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
        out = layer(x)[0]
        assert out.dtype == dtype and _rel(out, x.double() @ w64.t() + bias.double()) < tol, m


def _is_float_matrix(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()


def test_w8a16_with_groups_or_zero_points_stays_on_the_portable_kernel(monkeypatch, vllm_dist):
    shape = LayerShape(256, 128, 256, (128,), torch.bfloat16)
    for spec, why in [
        (
            WeightOnlySpec(8, 64, True, False),
            "group size 64 (torch's int8 kernel takes one scale per output channel)",
        ),
        (WeightOnlySpec(8, -1, False, False), "asymmetric weights (torch's int8 kernel has no zero points)"),
    ]:
        config = KernelConfig(spec, shape, "model.layers.0.mlp.down_proj", "cpu")
        assert cpu_dequant.CpuInt8WeightKernel.can_implement(config) == (False, why)
    tensors = make_wna16_tensors(128, 256, 8, 64, True)
    layer = _layer(monkeypatch, "cpu", ct_config(wna16(8, 64, True)), tensors, 256, 128, torch.bfloat16)
    assert layer.scheme.kernel.name == "CpuDequantizedKernel"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bits,group,symmetric", [(8, 64, True), (8, 32, False), (4, 64, False)])
def test_weights_dequantized_at_load_run_on_vllms_unquantized_gemm(
    monkeypatch, vllm_dist, dtype, tol, bits, group, symmetric
):
    """What no CPU kernel reads in low-bit form is dequantized once and multiplied by vLLM-CPU's own
    unquantized GEMM (its prepacked weight; the layer's bias added after): float64 reference."""
    tensors = make_wna16_tensors(128, 256, bits, group, symmetric, gen=torch.Generator().manual_seed(2))
    bias = torch.randn(128, generator=torch.Generator().manual_seed(3)).to(dtype)
    cfg = ct_config(wna16(bits, group, symmetric))
    layer = _layer(monkeypatch, "cpu", cfg, {**tensors, "bias": bias}, 256, 128, dtype, bias=True)
    kernel = layer.scheme.kernel
    kernel = getattr(kernel, "large", kernel)
    if kernel.name != "CpuDequantizedKernel":  # bf16 asymmetric W4A16: vLLM's cpu_gemm_wna16 takes it
        assert (bits, dtype, kernel.name) == (4, torch.bfloat16, "CpuWna16Kernel(CPUWNA16LinearKernel)")
        return
    assert kernel.weight is None and hasattr(kernel.holder, "cpu_linear")
    w64 = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": bits})
    for m in (1, 40):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
        out = layer(x)[0]
        assert out.dtype == dtype and _rel(out, x.double() @ w64.t() + bias.double()) < tol, m


def test_where_cpu_gemm_wna16_runs_amx_long_calls_stay_on_it(monkeypatch, vllm_dist, vllm_layout):
    """On an AMX CPU in bf16, vLLM's cpu_gemm_wna16 beat dequantizing at 16-4096 tokens per call
    (benchmarks/results/w4_prefill_dequant_cpu_amx.md), so the dequantizing kernel passes, saying why."""
    monkeypatch.setattr(cpu_dequant, "wna16_runs_amx", lambda config: True)
    layer, _ = _w4a16(monkeypatch, 128, 256, 32)
    assert layer.scheme.kernel.name == "CpuInt4GemvKernel(large: CpuWna16Kernel(CPUWNA16LinearKernel))"
    shape = LayerShape(256, 128, 256, (128,), torch.bfloat16)
    config = KernelConfig(WeightOnlySpec(4, 32, True, False), shape, "model.layers.0.mlp.down_proj", "cpu")
    ok, why = cpu_dequant.CpuWna16PrefillKernel.can_implement(config)
    assert not ok and "cpu_gemm_wna16 runs its AMX path here" in why


@pytest.mark.parametrize(
    "amx,granted,dtype,expect",
    [
        (True, True, torch.bfloat16, True),
        (True, True, torch.float16, False),  # vLLM's _get_isa_hint: AMX for bf16 scales only
        (True, False, torch.bfloat16, False),  # permission refused: CpuWna16Kernel stays on AVX-512
        (False, True, torch.bfloat16, False),
    ],
)
def test_wna16_runs_amx_follows_vllms_isa_choice(monkeypatch, amx, granted, dtype, expect):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(cpu_dequant, "request_amx_tiles", lambda: granted)
    shape = LayerShape(256, 128, 256, (128,), dtype)
    config = KernelConfig(WeightOnlySpec(4, 32, True, False), shape, "model.layers.0.mlp.down_proj", "cpu")
    assert WNA16_RUNS_AMX(config) is expect
