"""The Ascend kernels (kernels/npu.py) and the pure-torch torch_npu emulation they are validated on.

(a) each emulated op against a direct float64 formula; (c) misuse fails as the torch_npu docs say
it does on hardware; and which NPU kernel each layer gets and what it prepares (layouts, dtypes,
fallbacks). Every scheme variant runs through real vLLM layers under "npu" in
test_scheme_numerics.py and test_tensor_parallel.py. No NPU: this is the only validation they have.
"""

from __future__ import annotations

import gc
import logging
import math
import struct
import sys

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
from tests.npu_helpers import emulation_module, use_chip, use_npu_emulation

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


def fp19_f64(v: float, round_mode: int = 0) -> float:
    """The float32 value v kept to 10 mantissa bits, in float64 arithmetic: truncated toward zero
    (round_mode 0) or rounded to nearest (1), from its binade, not from its bits."""
    e = math.floor(math.log2(abs(v)))
    ulp = 2.0 ** (e - 10)
    k = math.floor(abs(v) / ulp) if round_mode == 0 else round(abs(v) / ulp)
    return math.copysign(k * ulp, v)


def test_trans_quant_param_against_float64():
    scale = (torch.rand(64, generator=G) * 10.0 ** torch.randint(-7, 3, (64,), generator=G)).float() + 1e-9
    enc = npu.npu_trans_quant_param(scale)
    assert enc.dtype == torch.int64 and enc.shape == scale.shape
    for v, e in zip(scale.tolist(), enc.tolist()):
        (bits,) = struct.unpack("<I", struct.pack("<f", v))
        assert e == (bits & 0xFFFFE000) | (1 << 46)  # the documented formula, in Python integers
    # the dequant unit reads FP19: the float64 truncation of each scale to 10 mantissa bits
    dec = npu.decode_int64_scale(enc)
    assert dec.double().tolist() == [fp19_f64(v) for v in scale.tolist()]
    assert float(((dec.double() - scale.double()) / scale.double()).abs().max()) < 2**-10
    # round_mode=1 (R_INT): to the nearest FP19 value (no ties among these random scales)
    dec1 = npu.decode_int64_scale(npu.npu_trans_quant_param(scale, round_mode=1))
    assert dec1.double().tolist() == [fp19_f64(v, 1) for v in scale.tolist()]
    assert float(((dec1.double() - scale.double()) / scale.double()).abs().max()) <= 2**-11
    # offsets: Max(Min(INT(Round(offset)), 255), -256) as 9 bits at bit 37, the scale bits kept
    offset = torch.tensor([0.4, -0.6, 3.5, 4.5, -300.0, 1000.0, -256.0, 255.2])
    s8 = scale[:8].contiguous()
    enc = npu.npu_trans_quant_param(s8, offset)
    assert npu.decode_int64_offset(enc).tolist() == [0, -1, 4, 4, -256, 255, -256, 255]
    assert torch.equal(enc & 0x4000FFFFFFFF, npu.npu_trans_quant_param(s8))
    one = npu.npu_trans_quant_param(s8, torch.tensor([-3.0]))  # (1,) broadcasts to (n,)
    assert one.shape == (8,) and npu.decode_int64_offset(one).tolist() == [-3] * 8
    s2 = s8.reshape(1, 8)
    assert torch.equal(npu.npu_trans_quant_param(s2), npu.npu_trans_quant_param(s8).reshape(1, 8))


def test_trans_quant_param_docs_example_round_trips():
    """The 16 outputs printed in torch_npu-npu_trans_quant_param.md (random scale and offset, round_mode 1):
    each is a well-formed quant parameter that re-encodes from its decoded scale and offset."""
    doc = [70507248869376, 70509369614336, 70507209793536, 140463653937152, 140603250524160, 140603257561088,
           140603230814208, 70369813069824, 70369794605056, 140463675252736, 70784266256384, 70507233009664,
           140601114345472, 70371966238720, 140603258257408, 140603254505472]  # fmt: skip
    enc = torch.tensor(doc, dtype=torch.int64)
    assert bool(((enc >> 46) & 1 == 1).all()) and bool((enc & 0x1FFF == 0).all())
    scale, offset = npu.decode_int64_scale(enc), npu.decode_int64_offset(enc)
    assert bool((offset >= -256).all() and (offset <= 255).all())
    assert torch.equal(npu.npu_trans_quant_param(scale, offset.float(), 1), enc)


def test_upstream_int64_encodings_read_alike():
    """msModelSlim's deqscale2int64 (the float32 bit pattern, what vLLM-Ascend's W8A8 static passes for
    float16 models) and npu_trans_quant_param give the same dequant scale."""
    from msmodelslim.format.common.deqscale import deqscale2int64

    s = torch.rand(64, generator=G) * 0.01 + 1e-5
    raw = deqscale2int64(s)
    assert raw.dtype == torch.int64 and not bool(((raw >> 46) & 1).any())
    assert torch.equal(npu.decode_int64_scale(raw), npu.decode_int64_scale(npu.npu_trans_quant_param(s)))
    with pytest.raises(ValueError, match="not a quant-param encoding"):
        npu.decode_int64_scale(torch.tensor([1 << 33]))


def test_trans_quant_param_misuse():
    with pytest.raises(TypeError, match="float32"):
        npu.npu_trans_quant_param(torch.ones(4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="contiguous"):
        npu.npu_trans_quant_param(torch.ones(4, 2)[:, 0])
    with pytest.raises(RuntimeError, match="non-empty"):
        npu.npu_trans_quant_param(torch.ones(0))
    with pytest.raises(RuntimeError, match="round_mode"):
        npu.npu_trans_quant_param(torch.ones(4), round_mode=2)
    with pytest.raises(RuntimeError, match="broadcast"):
        npu.npu_trans_quant_param(torch.ones(4), torch.ones(3))


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
    assert npu.get_npu_format(w_nz) == 29 and torch.equal(w_nz, x2) and npu.get_npu_format(x2) == 2
    # dynamic: (x1 @ x2) * scale * pertoken + float bias
    out = npu.npu_quant_matmul(x1, w_nz, scale, pertoken_scale=pt, bias=bias_f, output_dtype=torch.bfloat16)
    ref = acc * scale.double() * pt.double().unsqueeze(1) + bias_f.double()
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and rel(out, ref) < 2**-8
    out = npu.npu_quant_matmul(x1, x2, scale, pertoken_scale=pt, bias=bias_f, output_dtype=torch.float16)
    assert rel(out, ref) < 2**-10
    bias_h = bias_f.half()  # fp16 output with pertoken_scale also takes a float16 bias
    out = npu.npu_quant_matmul(x1, x2, scale, pertoken_scale=pt, bias=bias_h, output_dtype=torch.float16)
    assert rel(out, acc * scale.double() * pt.double().unsqueeze(1) + bias_h.double()) < 2**-10
    # static fp16: (x1 @ x2 + int32 bias) * FP19(scale), the int64 of npu_trans_quant_param
    qparam = npu.npu_trans_quant_param(scale)
    out = npu.npu_quant_matmul(x1, w_nz, qparam, bias=bias_i, output_dtype=torch.float16)
    s19 = torch.tensor([fp19(v) for v in scale.tolist()], dtype=torch.float64)
    ref = (acc + bias_i.double()) * s19
    assert out.dtype == torch.float16 and rel(out, ref) < 2**-10
    # int8 output, the offset packed by npu_trans_quant_param: round((acc + bias) * FP19(scale) + offset)
    small = (torch.rand(n, generator=G) * 4e-3 + 1e-4).float()
    offs = torch.randint(-20, 20, (n,), generator=G).float()
    out = npu.npu_quant_matmul(x1, x2, npu.npu_trans_quant_param(small, offs), bias=bias_i)
    s19 = torch.tensor([fp19(v) for v in small.tolist()], dtype=torch.float64)
    ref = ((acc + bias_i.double()) * s19 + offs.double()).round().clamp(-128, 127)
    assert out.dtype == torch.int8 and float((out.double() - ref).abs().max()) <= 1
    assert float((out.double() != ref).double().mean()) < 0.02  # float32 epilogue vs float64 at ties
    # static bf16: float32 scale used as is
    out = npu.npu_quant_matmul(x1, x2, scale, bias=bias_i, output_dtype=torch.bfloat16)
    assert rel(out, (acc + bias_i.double()) * scale.double()) < 2**-8
    # int32 output: the exact accumulator
    out = npu.npu_quant_matmul(x1, x2, scale.to(torch.bfloat16), output_dtype=torch.int32)
    assert out.dtype == torch.int32 and torch.equal(out.double(), acc)


@pytest.mark.parametrize(  # FRACTAL_NZ int8 weights take per-channel antiquant only (misuse test below)
    "layout,group",
    [
        (lay, g)
        for lay in ("int8", "int8-nz", "int4-kn", "int4-nk-t")
        for g in (0, 32)
        if (lay, g) != ("int8-nz", 32)
    ],
)
def test_weight_quant_batchmatmul_formula(layout, group):
    m, k, n = 6, 128, 40
    dtype = torch.float16
    bits = 8 if layout.startswith("int8") else 4
    lo = -(1 << (bits - 1))
    w = torch.randint(lo, -lo, (k, n), generator=G, dtype=torch.int32)  # [k, n]
    rows = k // group if group else 1
    scale = (torch.rand(rows, n, generator=G) * 0.02 + 1e-3).to(dtype)
    offset = torch.randint(lo, -lo, (rows, n), generator=G).to(dtype)
    if not group:
        scale, offset = scale.reshape(n), offset.reshape(n)
    if layout == "int8":
        weight = w.to(torch.int8)
    elif layout == "int8-nz":  # vLLM-Ascend's W8A16: [k, n] through maybe_trans_nz
        weight = npu.npu_format_cast(w.to(torch.int8), npu.ACL_FORMAT_FRACTAL_NZ)
        assert npu.get_npu_format(weight) == npu.ACL_FORMAT_FRACTAL_NZ
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
        ("float32 scale without pertoken, fp16", TypeError, "npu_trans_quant_param"),
        ("float32 scale, int8 output", TypeError, "npu_trans_quant_param"),
        ("fp16 scale with pertoken, fp16", TypeError, "unsupported dtype combination"),
        ("bf16 bias with pertoken, fp16", TypeError, "unsupported dtype combination"),
        ("fp16 bias with pertoken, bf16", TypeError, "unsupported dtype combination"),
        ("packed offset, fp16 output", RuntimeError, "for int8 output"),
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
        s = npu.npu_trans_quant_param(s)
        kw = dict(output_dtype=torch.float16, bias=torch.zeros(16, dtype=torch.float16))
    elif case == "float32 scale without pertoken, fp16":
        kw = dict(output_dtype=torch.float16, bias=torch.zeros(16, dtype=torch.int32))
    elif case == "float32 scale, int8 output":
        kw = dict(output_dtype=torch.int8)
    elif case == "fp16 scale with pertoken, fp16":  # vLLM-Ascend's W8A8_DYNAMIC call in a float16 model
        s = s.half()
        kw = dict(output_dtype=torch.float16, pertoken_scale=torch.ones(4), bias=torch.zeros(16).half())
    elif case == "bf16 bias with pertoken, fp16":
        kw = dict(output_dtype=torch.float16, pertoken_scale=torch.ones(4), bias=torch.zeros(16).bfloat16())
    elif case == "fp16 bias with pertoken, bf16":
        kw = dict(output_dtype=torch.bfloat16, pertoken_scale=torch.ones(4), bias=torch.zeros(16).half())
    elif case == "packed offset, fp16 output":
        s = npu.npu_trans_quant_param(s, torch.full((16,), 3.0))
        kw = dict(output_dtype=torch.float16)
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
        ("NZ int8 weight, per group", RuntimeError, "per-channel antiquant only"),
        ("NZ int4 weight", NotImplementedError, "not emulated"),
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
    elif case == "NZ int8 weight, per group":
        weight = npu.npu_format_cast(w.to(torch.int8), 29)
        scale, kw["antiquant_group_size"] = scale.repeat(2, 1), 32
    elif case == "NZ int4 weight":
        weight = npu.npu_format_cast(weight, 29)
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


# -- which NPU kernel each layer gets, and what it prepares -------------------------------------
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


def _kernel(layer):
    """The layer's kernel; for a kernel composed over another, the innermost one."""
    kernel = layer.scheme.kernel
    while hasattr(kernel, "inner"):
        kernel = kernel.inner
    return kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prepared_w8a8_static_layout(npu_backend, dtype):
    tensors = make_w8a8_tensors(48, 64, static=True, symmetric=False)
    layer = _prepared(ct_config(*w8a8_static(False)), tensors, 64, 48, dtype)
    kernel = _kernel(layer)
    assert kernel.name == "NpuInt8Kernel"
    assert kernel.weight.shape == (64, 48) and kernel.weight.dtype == torch.int8
    assert npu.get_npu_format(kernel.weight) == npu.ACL_FORMAT_FRACTAL_NZ
    deq = tensors["input_scale"].double() * tensors["weight_scale"].double().reshape(-1)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the scales are parameters of the model dtype
    if dtype == torch.float16:  # the documented int64 of npu_trans_quant_param: bit 46 set, FP19 bits
        enc = kernel.deq
        assert enc.dtype == torch.int64 and bool(((enc >> 46) & 1).all()) and bool((enc & 0x1FFF == 0).all())
        assert torch.equal(npu.npu_trans_quant_param(npu.decode_int64_scale(enc)), enc)
        got = npu.decode_int64_scale(enc).double()
        assert float(((got - deq) / deq).abs().max()) < 2**-10 + 3 * u
    else:
        assert kernel.deq.dtype == torch.float32
        assert float(((kernel.deq.double() - deq) / deq).abs().max()) < 3 * u
    expect_qb = -int(tensors["input_zero_point"]) * tensors["weight"].to(torch.int64).sum(1)
    assert kernel.quant_bias.dtype == torch.int32
    assert torch.equal(kernel.quant_bias.to(torch.int64), expect_qb)
    assert kernel.x_recip.dtype == dtype and kernel.x_recip.shape == (64,)
    assert layer.weight is None and layer.input_scale is None  # checkpoint copies freed


def test_prepared_weight_only_and_w4a8_layouts(npu_backend):
    dt = torch.bfloat16
    layer = _prepared(ct_config(wna16(4, 32, False)), make_wna16_tensors(48, 64, 4, 32, False), 64, 48, dt)
    assert layer.scheme.kernel.name == "NpuWeightOnlyKernel"
    wo = _kernel(layer).antiquant.args
    assert wo["weight"].dtype == torch.int32 and wo["weight"].shape == (64, 6)  # [in, out/8]
    assert wo["antiquant_scale"].shape == (2, 48) and wo["antiquant_offset"].dtype == dt
    assert wo["antiquant_group_size"] == 32 and npu.get_npu_format(wo["weight"]) == 2
    layer = _prepared(ct_config(wna16(4, None, True)), make_wna16_tensors(48, 64, 4, None, True), 64, 48, dt)
    wo = _kernel(layer).antiquant.args
    assert wo["weight"].shape == (8, 48) and wo["antiquant_group_size"] == 0
    cfg = ct_config(wna16(4, 32, True, "group"))
    layer = _prepared(cfg, make_wna16_tensors(48, 64, 4, 32, True, act_order=True), 64, 48, dt)
    # act-order served by permuting input channels once, then the grouped kernel
    assert layer.scheme.kernel.name == "ActOrderKernel(NpuWeightOnlyKernel)"
    assert layer.scheme.kernel.perm is not None
    layer = _prepared(ct_config(*w4a8(None)), make_w4a8_tensors(48, 64, None, False), 64, 48, dt)
    assert layer.scheme.kernel.name == "PerChannelW4A8AsInt8Kernel(NpuInt8Kernel)"
    assert _kernel(layer).weight.dtype == torch.int8
    layer = _prepared(ct_config(*w4a8(32)), make_w4a8_tensors(48, 64, 32, False), 64, 48, dt)
    assert layer.scheme.kernel.name == "NpuW4A8AntiquantKernel"
    assert _kernel(layer).antiquant.args["weight"].dtype == torch.int32


def test_unsupported_group_falls_back_with_warning(npu_backend, caplog):
    with caplog.at_level(logging.WARNING, logger="vllm_ptq_ascend.kernels"):
        layer = _prepared(ct_config(*w4a8(8)), make_w4a8_tensors(48, 64, 8, False), 64, 48, torch.bfloat16)
    assert layer.scheme.kernel.name == "TorchW4A8Kernel"
    assert "model.layers.0.mlp.down_proj" in caplog.text and "group size 8" in caplog.text


def test_float32_model_refused(npu_backend):
    with pytest.raises(ValueError, match=r"down_proj.*float16/bfloat16"):
        _prepared(ct_config(*W8A8_DYNAMIC), make_w8a8_tensors(48, 64), 64, 48, torch.float32)


def test_imports_without_torch_npu(monkeypatch):
    """The module and the candidate lists import anywhere; torch_npu is needed only to choose a kernel."""
    from vllm_ptq_ascend.kernels import (
        Int8LinearSpec,
        KernelConfig,
        LayerShape,
        choose_kernel,
        platform_kernels,
    )
    from vllm_ptq_ascend.kernels.npu import NpuInt8Kernel

    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError
    assert platform_kernels("npu").kernels[Int8LinearSpec] == (NpuInt8Kernel,)
    config = KernelConfig(Int8LinearSpec(True, False, True), LayerShape(8, 8, 8, (8,), torch.bfloat16), "L")
    with pytest.raises(ImportError):
        choose_kernel(config, platform="npu")


# -- FRACTAL_NZ where vLLM-Ascend casts, and the chip ---------------------------------------------
def test_format_belongs_to_the_storage():
    w = torch.randint(-128, 128, (64, 16), generator=G, dtype=torch.int8)
    nz = npu.npu_format_cast(w, npu.ACL_FORMAT_FRACTAL_NZ)
    assert npu.get_npu_format(nz) == 29 and npu.get_npu_format(w) == 2 and torch.equal(nz, w)
    assert npu.get_npu_format(nz.t()) == 29 and npu.get_npu_format(nz[:8]) == 29  # views: same storage
    param = torch.nn.Parameter(torch.empty(64, 16, dtype=torch.int8), requires_grad=False)
    param.data = nz  # what vLLM-Ascend does: layer.weight.data = maybe_trans_nz(layer.weight.data)
    assert npu.get_npu_format(param) == 29
    assert npu.get_npu_format(nz.clone()) == 2 and npu.get_npu_format(npu.npu_format_cast(nz, 2)) == 2
    key = id(nz.untyped_storage())
    assert key in npu._FORMATS
    del nz, param
    gc.collect()
    # forgotten with its storage (counting entries would also count other tests' storages freed here)
    assert key not in npu._FORMATS


@pytest.mark.parametrize("mode", [None, "0", "1", "2"])
def test_nz_where_vllm_ascend_casts(npu_backend, monkeypatch, mode):
    """vllm_ascend/utils.py maybe_trans_nz: int8 weights in NZ unless weight_nz_mode is 0 (default 1).
    vLLM-Ascend casts the int8 weights of W8A8 (static and dynamic) and W8A16 per channel; int4-packed
    and per-group int8 weight-only weights stay ND here (the op takes NZ per group only for int4)."""
    if mode is None:
        monkeypatch.delenv("VLLM_ASCEND_ENABLE_NZ", raising=False)
    else:
        monkeypatch.setenv("VLLM_ASCEND_ENABLE_NZ", mode)
    want = 2 if mode == "0" else 29
    dt = torch.float16
    layer = _prepared(ct_config(*W8A8_DYNAMIC), make_w8a8_tensors(48, 64), 64, 48, dt)
    assert npu.get_npu_format(_kernel(layer).weight) == want
    layer = _prepared(ct_config(*w8a8_static(True)), make_w8a8_tensors(48, 64, static=True), 64, 48, dt)
    assert npu.get_npu_format(_kernel(layer).weight) == want
    layer = _prepared(ct_config(wna16(8, None, True)), make_wna16_tensors(48, 64, 8, None, True), 64, 48, dt)
    weight = _kernel(layer).antiquant.args["weight"]
    assert weight.dtype == torch.int8 and npu.get_npu_format(weight) == want
    layer = _prepared(ct_config(wna16(8, 32, True)), make_wna16_tensors(48, 64, 8, 32, True), 64, 48, dt)
    assert npu.get_npu_format(_kernel(layer).antiquant.args["weight"]) == 2
    layer = _prepared(ct_config(wna16(4, None, True)), make_wna16_tensors(48, 64, 4, None, True), 64, 48, dt)
    weight = _kernel(layer).antiquant.args["weight"]
    assert weight.dtype == torch.int32 and npu.get_npu_format(weight) == 2
    # the NZ weights still compute: an NZ int8 weight-only layer against its float64 reference
    tensors = make_wna16_tensors(48, 64, 8, None, True, gen=torch.Generator().manual_seed(7))
    w = torch.randint(
        -128, 128, (48, 64), generator=torch.Generator().manual_seed(7)
    ).double()  # its first draw
    layer = _prepared(ct_config(wna16(8, None, True)), tensors, 64, 48, dt)
    x = torch.randn(5, 64, generator=G).to(dt)
    out = layer.quant_method.apply(layer, x)
    ref = x.double() @ (w * tensors["weight_scale"].to(dt).double()).t()
    assert rel(out, ref) < 2e-3


@pytest.mark.parametrize("soc", ["Ascend910B1", "Ascend910B4", "Ascend910_9391", "Ascend910_9362"])
def test_atlas_a2_a3_served(monkeypatch, vllm_dist, soc):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    use_chip(monkeypatch, soc)
    layer = _prepared(ct_config(*W8A8_DYNAMIC), make_w8a8_tensors(48, 64), 64, 48, torch.bfloat16)
    assert npu.npu.get_device_name() == soc and _kernel(layer).weight.dtype == torch.int8


@pytest.mark.parametrize(
    "case,dtype,lacks",
    [
        ("W8A8 dynamic", torch.float16, "needs npu_dynamic_quant, per-token scales in npu_quant_matmul"),
        ("W8A8 dynamic", torch.bfloat16, "per-token scales in npu_quant_matmul, bfloat16, which"),
        ("W4A16", torch.float16, "needs int4 matmuls, which"),
        ("W8A8 static", torch.float16, "other weight layouts"),
        ("W8A8 static", torch.bfloat16, "needs bfloat16, which"),
    ],
)
def test_310p_refused_naming_layer_and_what_it_lacks(monkeypatch, vllm_dist, case, dtype, lacks):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    use_chip(monkeypatch, "Ascend310P3")
    cfg, tensors = {
        "W8A8 dynamic": (ct_config(*W8A8_DYNAMIC), make_w8a8_tensors(48, 64)),
        "W4A16": (ct_config(wna16(4, 32, True)), make_wna16_tensors(48, 64, 4, 32, True)),
        "W8A8 static": (ct_config(*w8a8_static(True)), make_w8a8_tensors(48, 64, static=True)),
    }[case]
    with pytest.raises(RuntimeError) as err:
        _prepared(cfg, tensors, 64, 48, dtype)
    msg = str(err.value)
    for part in ("model.layers.0.mlp.down_proj", "Ascend310P3", "Atlas 310P", lacks, "Atlas A2/A3"):
        assert part in msg, (part, msg)


def test_other_chips_refused(monkeypatch, vllm_dist):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    use_chip(monkeypatch, "Ascend910A")
    with pytest.raises(RuntimeError, match=r"down_proj.*serve Atlas A2/A3 .* only; this is Ascend910A"):
        _prepared(ct_config(*W8A8_DYNAMIC), make_w8a8_tensors(48, 64), 64, 48, torch.float16)


def test_emulated_310p_refuses_what_its_docs_do_not_list(monkeypatch):
    emu = use_chip(monkeypatch, "Ascend310P1")
    assert emu.npu.get_soc_version() == 200 and emu.chip_family() == "310P"
    with pytest.raises(RuntimeError, match="npu_dynamic_quant: not supported"):
        emu.npu_dynamic_quant(torch.randn(2, 8).half())
    x1, w, s = _qmm_args()
    q = emu.npu_trans_quant_param(s * 1e-3)  # outputs within float16
    with pytest.raises(RuntimeError, match="must be FRACTAL_NZ"):
        emu.npu_quant_matmul(x1, w, q, output_dtype=torch.float16)
    w_nz = emu.npu_format_cast(w, 29)
    with pytest.raises(RuntimeError, match="pertoken_scale is not supported"):
        emu.npu_quant_matmul(x1, w_nz, s, pertoken_scale=torch.ones(4), output_dtype=torch.float16)
    with pytest.raises(TypeError, match="not supported here"):
        emu.npu_quant_matmul(x1, w_nz, s, output_dtype=torch.bfloat16)
    acc = x1.double() @ w.double()
    out = emu.npu_quant_matmul(x1, w_nz, q, output_dtype=torch.float16)  # table 1: fp16, int64 scale
    assert rel(out, acc * emu.decode_int64_scale(q).double()) < 2**-10
