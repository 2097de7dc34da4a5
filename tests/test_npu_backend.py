"""The Ascend backend (kernels/npu.py) and the pure-torch torch_npu emulation it is validated on.

(a) each emulated op against a direct float64 formula; (c) misuse fails as the torch_npu docs say
it does on hardware; and what NpuBackend prepares (layouts, dtypes, fallbacks). Every scheme
variant runs through real vLLM layers under "npu" in test_scheme_numerics.py and
test_tensor_parallel.py. No NPU: this is the only validation the backend has.
"""

from __future__ import annotations

import logging
import struct
import sys

import pytest
import torch
from layer_helpers import (
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
from npu_helpers import emulation_module, use_npu_emulation

npu = emulation_module()
G = torch.Generator().manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fp19(v: float) -> float:
    """float32 with its 13 lowest mantissa bits cleared (npu_trans_quant_param's FP19), via struct."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFE000))[0]


# -- (a) ops against float64 formulas ----------------------------------------------------------
def test_int4pack_order_and_round_trip():
    row = torch.tensor([[1, -1, 0, 0, 0, 0, -8, 7]], dtype=torch.int32)
    packed = npu.npu_convert_weight_to_int4pack(row)
    # nibble i holds value i, two's complement, lowest nibble first: 0x78_00_00_F1
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert int(packed) == struct.unpack("<i", struct.pack("<I", 0x780000F1))[0]
    w = torch.randint(-8, 8, (12, 40), generator=G, dtype=torch.int32)
    p = npu.npu_convert_weight_to_int4pack(w)
    assert p.shape == (12, 5)
    expect = sum(((w[:, i::8].to(torch.int64) & 0xF) << (4 * i)) for i in range(8))
    assert torch.equal(p.to(torch.int64) & 0xFFFFFFFF, expect)
    assert torch.equal(npu.unpack_int4pack(p).to(torch.int32), w)


def test_int64_scale_encoding():
    from vllm_ptq_ascend.kernels.npu import float_scale_to_int64

    s = torch.rand(64, generator=G) * 0.01 + 1e-5
    enc = float_scale_to_int64(s)
    assert enc.dtype == torch.int64
    for v, e in zip(s.tolist()[:8], enc.tolist()[:8]):  # float32 bits in the low 32 bits
        assert e == struct.unpack("<I", struct.pack("<f", v))[0]
    dec = npu.decode_int64_scale(enc)
    assert dec.tolist() == [fp19(v) for v in s.tolist()]
    assert float(((dec.double() - s.double()) / s.double()).abs().max()) < 2**-10
    assert float(npu.decode_int64_scale(float_scale_to_int64(torch.tensor([0.375])))) == 0.375


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dynamic_quant(dtype):
    x = (torch.randn(9, 64, generator=G) * 3).to(dtype)
    x[3] = 0  # an all-zero token
    y, scale = npu.npu_dynamic_quant(x)
    assert y.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (9,)
    x64 = x.double()
    s64 = x64.abs().amax(-1) / 127
    assert torch.allclose(scale.double(), s64, rtol=1e-6, atol=0)
    ref = torch.round(x64 / s64.clamp(min=1e-30).unsqueeze(-1)).clamp(-128, 127)
    assert float((y.double() - ref).abs().max()) <= 1  # float32 vs float64 at ties
    assert float((y.double() != ref).double().mean()) < 1e-2
    assert int(y[3].abs().max()) == 0


def test_quantize_static():
    x = (torch.randn(7, 48, generator=G) * 2).to(torch.bfloat16)
    recip = torch.full((48,), 50.0, dtype=torch.bfloat16)  # 1 / 0.02
    offset = torch.full((48,), -7.0, dtype=torch.bfloat16)
    y = npu.npu_quantize(x, recip, offset, torch.qint8, -1, False)
    ref = torch.round(x.double() * 50 - 7).clamp(-128, 127)
    assert y.dtype == torch.int8 and torch.equal(y.double(), ref)
    assert torch.equal(
        npu.npu_quantize(x, recip, None, torch.qint8, -1, False).double(),
        torch.round(x.double() * 50).clamp(-128, 127),
    )


def test_quant_matmul_formulas():
    m, k, n = 5, 96, 24
    x1 = torch.randint(-128, 128, (m, k), generator=G, dtype=torch.int8)
    x2 = torch.randint(-128, 128, (k, n), generator=G, dtype=torch.int8)
    acc = x1.double() @ x2.double()
    scale = torch.rand(n, generator=G) * 1e-4 + 1e-6
    pt = torch.rand(m, generator=G) * 0.05 + 1e-3
    bias_f = torch.randn(n, generator=G)
    bias_i = torch.randint(-5000, 5000, (n,), generator=G, dtype=torch.int32)
    w_nz = npu.npu_format_cast(x2, npu.ACL_FORMAT_FRACTAL_NZ)
    assert npu.get_npu_format(w_nz) == 29 and torch.equal(w_nz, x2) and npu.get_npu_format(w_nz.t()) == 2
    # dynamic: (x1 @ x2) * scale * pertoken + float bias
    out = npu.npu_quant_matmul(x1, w_nz, scale, pertoken_scale=pt, bias=bias_f, output_dtype=torch.bfloat16)
    ref = acc * scale.double() * pt.double().unsqueeze(1) + bias_f.double()
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and rel(out, ref) < 2**-8
    out = npu.npu_quant_matmul(x1, x2, scale, pertoken_scale=pt, bias=bias_f, output_dtype=torch.float16)
    assert rel(out, ref) < 2**-10
    # static fp16: (x1 @ x2 + int32 bias) * FP19(scale), int64-encoded
    from vllm_ptq_ascend.kernels.npu import float_scale_to_int64

    out = npu.npu_quant_matmul(x1, w_nz, float_scale_to_int64(scale), bias=bias_i, output_dtype=torch.float16)
    s19 = torch.tensor([fp19(v) for v in scale.tolist()], dtype=torch.float64)
    ref = (acc + bias_i.double()) * s19
    assert out.dtype == torch.float16 and rel(out, ref) < 2**-10
    # static bf16: float32 scale used as is
    out = npu.npu_quant_matmul(x1, x2, scale, bias=bias_i, output_dtype=torch.bfloat16)
    assert rel(out, (acc + bias_i.double()) * scale.double()) < 2**-8
    # int32 output: the exact accumulator
    out = npu.npu_quant_matmul(x1, x2, scale.to(torch.bfloat16), output_dtype=torch.int32)
    assert out.dtype == torch.int32 and torch.equal(out.double(), acc)


@pytest.mark.parametrize("layout", ["int8", "int4-kn", "int4-nk-t"])
@pytest.mark.parametrize("group", [0, 32])
def test_weight_quant_batchmatmul_formula(layout, group):
    m, k, n = 6, 128, 40
    dtype = torch.float16
    bits = 8 if layout == "int8" else 4
    lo = -(1 << (bits - 1))
    w = torch.randint(lo, -lo, (k, n), generator=G, dtype=torch.int32)  # [k, n]
    rows = k // group if group else 1
    scale = (torch.rand(rows, n, generator=G) * 0.02 + 1e-3).to(dtype)
    offset = torch.randint(lo, -lo, (rows, n), generator=G).to(dtype)
    if not group:
        scale, offset = scale.reshape(n), offset.reshape(n)
    if layout == "int8":
        weight = w.to(torch.int8)
    elif layout == "int4-kn":
        weight = npu.npu_convert_weight_to_int4pack(w)  # (k, n/8)
        assert weight.shape == (k, n // 8)
    else:
        weight = npu.npu_convert_weight_to_int4pack(w.t().contiguous()).t()  # (k/8, n) view
        assert weight.shape == (k // 8, n) and not weight.is_contiguous()
    x = torch.randn(m, k, generator=G).to(dtype)
    bias = torch.randn(n, generator=G).to(dtype)
    out = npu.npu_weight_quant_batchmatmul(
        x, weight, scale, antiquant_offset=offset, bias=bias, antiquant_group_size=group
    )
    s = scale.double().reshape(rows, n).repeat_interleave(k // rows, 0)
    o = offset.double().reshape(rows, n).repeat_interleave(k // rows, 0)
    ref = x.double() @ ((w.double() + o) * s) + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel(out, ref) < 2e-3


# -- (c) misuse fails as on hardware -----------------------------------------------------------
def _qmm_args():
    x1 = torch.randint(-128, 128, (4, 64), generator=G, dtype=torch.int8)
    w = torch.randint(-128, 128, (64, 16), generator=G, dtype=torch.int8)
    return x1, w, torch.rand(16, generator=G) + 0.1


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("float weight", TypeError, "must both be int8"),
        ("weight [n, k]", RuntimeError, "K of x1"),
        ("fp16 scale", TypeError, "unsupported dtype combination"),
        ("int64 scale with bf16 output", TypeError, "unsupported dtype combination"),
        ("float bias without pertoken, fp16", TypeError, "unsupported dtype combination"),
        ("pertoken of wrong length", RuntimeError, "pertoken_scale must be 1-D"),
        ("scale of wrong length", RuntimeError, "scale must be 1-D"),
        ("x1 in FRACTAL_NZ", RuntimeError, "x1 must be ND"),
    ],
)
def test_quant_matmul_misuse(case, exc, match):
    x1, w, s = _qmm_args()
    kw = dict(output_dtype=torch.bfloat16)
    if case == "float weight":
        w = w.to(torch.bfloat16)
    elif case == "weight [n, k]":
        w = w.t().contiguous()
    elif case == "fp16 scale":
        s = s.half()
    elif case == "int64 scale with bf16 output":
        s = s.view(torch.int32).to(torch.int64)
    elif case == "float bias without pertoken, fp16":
        kw = dict(output_dtype=torch.float16, bias=torch.zeros(16, dtype=torch.float16))
    elif case == "pertoken of wrong length":
        kw["pertoken_scale"] = torch.ones(5)
    elif case == "scale of wrong length":
        s = s[:7]
    elif case == "x1 in FRACTAL_NZ":
        x1 = npu.npu_format_cast(x1, 29)
    with pytest.raises(exc, match=match):
        npu.npu_quant_matmul(x1, w, s, **kw)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("int4 values not packed", RuntimeError, "antiquant_scale must be"),
        ("float weight", TypeError, "int8 or int32"),
        ("weight [n, k]", RuntimeError, "K of x"),
        ("scale of another dtype", TypeError, "antiquant_scale must have x's dtype"),
        ("fp16 bias for bf16 x", TypeError, "bias must be torch.float32"),
        ("group size 16", RuntimeError, "multiple of 32"),
        ("per-group scale of wrong shape", RuntimeError, "per-group antiquant_scale"),
        ("NZ weight", RuntimeError, "graph mode only"),
        ("float32 x", TypeError, "float16 or bfloat16"),
    ],
)
def test_weight_quant_batchmatmul_misuse(case, exc, match):
    k, n = 64, 16
    x = torch.randn(3, k, generator=G).to(torch.bfloat16)
    w = torch.randint(-8, 8, (k, n), generator=G, dtype=torch.int32)
    weight = npu.npu_convert_weight_to_int4pack(w)
    scale = torch.rand(n, generator=G).to(torch.bfloat16)
    kw = {}
    if case == "int4 values not packed":
        weight = w
    elif case == "float weight":
        weight = w.to(torch.bfloat16)
    elif case == "weight [n, k]":
        weight = w.t().contiguous().to(torch.int8)
    elif case == "scale of another dtype":
        scale = scale.float()
    elif case == "fp16 bias for bf16 x":
        kw["bias"] = torch.zeros(n, dtype=torch.float16)
    elif case == "group size 16":
        scale, kw["antiquant_group_size"] = scale.repeat(4, 1), 16
    elif case == "per-group scale of wrong shape":
        kw["antiquant_group_size"] = 32
    elif case == "NZ weight":
        weight = npu.npu_format_cast(w.to(torch.int8), 29)
    elif case == "float32 x":
        x = x.float()
    with pytest.raises(exc, match=match):
        npu.npu_weight_quant_batchmatmul(x, weight, scale, **kw)


def test_other_ops_misuse():
    with pytest.raises(TypeError, match="int32"):
        npu.npu_convert_weight_to_int4pack(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        npu.npu_convert_weight_to_int4pack(torch.full((4, 8), 9, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        npu.npu_convert_weight_to_int4pack(torch.zeros(4, 12, dtype=torch.int32))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        npu.npu_dynamic_quant(torch.randn(3, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    with pytest.raises(TypeError, match="input's dtype"):
        npu.npu_quantize(x, torch.ones(8), None, torch.qint8, -1, False)
    with pytest.raises(RuntimeError, match="1-D of size 8"):
        npu.npu_quantize(x, torch.ones(5, dtype=torch.bfloat16), None, torch.qint8, -1, False)


# -- what NpuBackend prepares ------------------------------------------------------------------
@pytest.fixture
def npu_backend(monkeypatch, vllm_dist):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    return use_npu_emulation(monkeypatch)


def _prepared(cfg, tensors, in_f, out_f, dtype, bias=False):
    layer = build_layer("ReplicatedLinear", cfg, in_f, out_f, dtype, bias=bias)
    load_tensors(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prepared_w8a8_static_layout(npu_backend, dtype):
    tensors = make_w8a8_tensors(48, 64, static=True, symmetric=False)
    layer = _prepared(ct_config(*w8a8_static(False)), tensors, 64, 48, dtype)
    assert layer.ptq_npu_w.shape == (64, 48) and layer.ptq_npu_w.dtype == torch.int8
    assert npu.get_npu_format(layer.ptq_npu_w) == npu.ACL_FORMAT_FRACTAL_NZ
    assert layer.ptq_npu_deq.dtype == (torch.int64 if dtype == torch.float16 else torch.float32)
    expect_qb = -int(tensors["input_zero_point"]) * tensors["weight"].to(torch.int64).sum(1)
    assert layer.ptq_npu_quant_bias.dtype == torch.int32
    assert torch.equal(layer.ptq_npu_quant_bias.to(torch.int64), expect_qb)
    assert layer.ptq_npu_x_recip.dtype == dtype and layer.ptq_npu_x_recip.shape == (64,)
    assert layer.weight is None and layer.input_scale is None  # checkpoint copies freed


def test_prepared_weight_only_and_w4a8_layouts(npu_backend):
    dt = torch.bfloat16
    layer = _prepared(ct_config(wna16(4, 32, False)), make_wna16_tensors(48, 64, 4, 32, False), 64, 48, dt)
    wo = layer.ptq_npu_wo
    assert wo["weight"].dtype == torch.int32 and wo["weight"].shape == (64, 6)  # [in, out/8]
    assert wo["antiquant_scale"].shape == (2, 48) and wo["antiquant_offset"].dtype == dt
    assert wo["antiquant_group_size"] == 32 and npu.get_npu_format(wo["weight"]) == 2
    layer = _prepared(ct_config(wna16(4, None, True)), make_wna16_tensors(48, 64, 4, None, True), 64, 48, dt)
    assert layer.ptq_npu_wo["weight"].shape == (8, 48) and layer.ptq_npu_wo["antiquant_group_size"] == 0
    cfg = ct_config(wna16(4, 32, True, "group"))
    layer = _prepared(cfg, make_wna16_tensors(48, 64, 4, 32, True, act_order=True), 64, 48, dt)
    assert layer.ptq_npu_perm is not None  # act-order served by permuting input channels once
    layer = _prepared(ct_config(*w4a8(None)), make_w4a8_tensors(48, 64, None, False), 64, 48, dt)
    assert layer.ptq_npu_w4a8 == "int8" and layer.ptq_npu_w.dtype == torch.int8
    layer = _prepared(ct_config(*w4a8(32)), make_w4a8_tensors(48, 64, 32, False), 64, 48, dt)
    assert layer.ptq_npu_w4a8 == "weight_only" and layer.ptq_npu_wo["weight"].dtype == torch.int32


def test_unsupported_group_falls_back_with_warning(npu_backend, caplog):
    with caplog.at_level(logging.WARNING, logger="vllm_ptq_ascend.kernels.npu"):
        layer = _prepared(ct_config(*w4a8(8)), make_w4a8_tensors(48, 64, 8, False), 64, 48, torch.bfloat16)
    assert layer.ptq_npu_w4a8 == "torch"
    assert "model.layers.0.mlp.down_proj" in caplog.text and "group size 8" in caplog.text


def test_float32_model_refused(npu_backend):
    with pytest.raises(ValueError, match=r"down_proj.*float16/bfloat16"):
        _prepared(ct_config(*W8A8_DYNAMIC), make_w8a8_tensors(48, 64), 64, 48, torch.float32)


def test_imports_without_torch_npu(monkeypatch):
    """The module and the registry import anywhere; torch_npu is needed only to prepare a layer."""
    from vllm_ptq_ascend.kernels import _backend, get_backend
    from vllm_ptq_ascend.kernels.npu import NpuBackend

    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError
    _backend.cache_clear()
    try:
        assert isinstance(get_backend("npu"), NpuBackend)
    finally:
        _backend.cache_clear()
    layer = torch.nn.Module()
    layer.params_dtype = torch.bfloat16
    with pytest.raises(ImportError):
        NpuBackend().quant_act_int8(layer, torch.zeros(1, 8, dtype=torch.bfloat16))
