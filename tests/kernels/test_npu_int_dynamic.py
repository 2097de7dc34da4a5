"""W4A4 / FlatQuant layers (IntDynamicSpec) on the NPU's and the portable kernels against a float64
reference, and which kernel each layer gets.

The NPU kernels run on the pure-torch torch_npu emulation (tests/npu_emulation), whose new ops are checked
here first against their documented formulas (npu_kronecker_quant, npu_dynamic_quant to quint4x2,
npu_quant_matmul on int4-packed operands). The reference is the spec's semantics in float64:
x -> vec(L^T X R), s = clip * max|x| / qmax, q = clamp(round(x / s), -qmax - 1, qmax),
out = s * s_w * (q @ q_w^T) + bias, with the per-token scale computed by the reference itself.

Tolerances come from an explicit error model of each path (what is rounded where, see ``_deltas``):
a q value must equal the reference's wherever that error cannot move x / s across a rounding
boundary, may differ by one elsewhere, and the output must lie within the bound those flips, the
scale error and the output dtype's rounding (2^-8 bf16, 2^-11 fp16, applied twice: the product and
the bias addition) allow, element by element.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.npu_helpers import emulation_module, use_npu_emulation
from vllm_ptq_ascend.kernels import KernelConfig, LayerShape, choose_kernel
from vllm_ptq_ascend.kernels import npu as npu_kernels
from vllm_ptq_ascend.kernels.base import IntDynamicSpec, OnlineKronecker

emu = emulation_module()
PREFIX = "model.layers.0.mlp.down_proj"
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> 8 signed nibbles each, lowest first (the decoder of op-plugin's tests)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    return torch.where(nib >= 8, nib - 16, nib).reshape(*words.shape[:-1], -1)


# -- emulated ops against their documented formulas --------------------------------------------
def _near_half(t: torch.Tensor, delta: float) -> torch.Tensor:
    return ((t - torch.floor(t)) - 0.5).abs() <= delta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_kronecker_quant_formula(dtype, clip):
    k, m, n = 12, 8, 16
    g = gen(1)
    x = (torch.randn(k, m, n, generator=g) * 3).to(dtype)
    x[5] = 0  # an all-zero token
    p1 = (torch.randn(m, m, generator=g) / m**0.5).to(dtype)  # not symmetric: orientation matters
    p2 = (torch.randn(n, n, generator=g) / n**0.5).to(dtype)
    out, scale = emu.npu_kronecker_quant(x, p1, p2, clip_ratio=clip, dst_dtype=torch.int32)
    assert out.dtype == torch.int32 and out.shape == (k, m, n // 8)
    assert scale.dtype == torch.float32 and scale.shape == (k,)
    x2 = p1.double() @ (x.double() @ p2.double())  # docs: x' = x @ P2, x'' = P1 @ x'
    amax = x2.abs().amax(dim=(1, 2))
    ref_scale = amax * clip / 7
    # x @ P2 is stored in x's dtype, x'' in float16: relative error of the max below ~2 u_x
    u = UNIT_ROUNDOFF[dtype]
    assert torch.allclose(scale.double(), ref_scale, rtol=4 * u, atol=0)
    assert float(scale[5]) == 0.0
    t = x2 / torch.where(ref_scale > 0, ref_scale, 1).reshape(k, 1, 1)
    ref_q = torch.round(t).clamp(-8, 7)
    q = unpack_words(out).double()
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    # x @ P2 rounded to x's dtype moves t by well under 0.15 here; only values that close to a
    # rounding boundary may differ (by one)
    far = ~_near_half(t, 0.15) | (t.abs() > 7.5 + 0.15)
    assert torch.equal(q[far], ref_q[far])
    assert float((q - ref_q).abs().max()) <= 1
    assert float(far.double().mean()) > 0.55
    if clip < 1:
        assert bool((t.abs() > 7.5).any())  # saturation is exercised


def test_kronecker_quant_packing_and_saturation():
    eye8, eye16 = torch.eye(8, dtype=torch.float16), torch.eye(16, dtype=torch.float16)
    x = torch.zeros(2, 8, 16, dtype=torch.float16)
    x[0, 0, :8] = torch.tensor([1, -1, 0, 0, 0, 0, -7, 7], dtype=torch.float16)
    x[1, 0, :2] = torch.tensor([7, 1], dtype=torch.float16)
    out, scale = emu.npu_kronecker_quant(x, eye8, eye16)  # clip None = 1: scale = 7 / 7
    assert float(scale[0]) == 1.0
    # values 1, -1, 0, 0, 0, 0, -7, 7 -> nibbles 1, F, 0, 0, 0, 0, 9, 7, first value lowest
    assert int(out[0, 0, 0]) & 0xFFFFFFFF == 0x790000F1
    out, scale = emu.npu_kronecker_quant(x, eye8, eye16, clip_ratio=0.5)
    assert float(scale[1]) == 0.5  # max * clip / 7
    q = unpack_words(out[1, 0])
    assert q[:2].tolist() == [7, 2]  # 14 saturates to 7 (inferred), 1 / 0.5 = 2


def test_kronecker_quant_misuse():
    x = torch.randn(4, 8, 16).to(torch.bfloat16)
    p1, p2 = torch.eye(8, dtype=torch.bfloat16), torch.eye(16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x's dtype"):
        emu.npu_kronecker_quant(x, p1.half(), p2)
    with pytest.raises(RuntimeError, match=r"\(16, 16\)"):
        emu.npu_kronecker_quant(x, p1, p2[:8, :8])
    with pytest.raises(RuntimeError, match="multiple of 8"):
        emu.npu_kronecker_quant(x[..., :12], p1, p2[:12, :12])
    with pytest.raises(RuntimeError, match=r"\(0, 1\]"):
        emu.npu_kronecker_quant(x, p1, p2, clip_ratio=1.5)
    with pytest.raises(RuntimeError, match=r"\[1, 256\]"):
        big = torch.zeros(1, 2, 264, dtype=torch.bfloat16)
        emu.npu_kronecker_quant(big, p1[:2, :2], torch.eye(264, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        emu.npu_kronecker_quant(x.float(), p1.float(), p2.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dynamic_quant_int4(dtype):
    x = (torch.randn(9, 64, generator=gen(2)) * 3).to(dtype)
    x[4] = 0
    y, scale = emu.npu_dynamic_quant(x, dst_type=torch.quint4x2)
    assert y.dtype == torch.int32 and y.shape == (9, 8) and scale.shape == (9,)
    s64 = x.double().abs().amax(-1) / 7  # docs: rowMax(|x|) / DTYPE_MAX, 7 for int4
    assert torch.allclose(scale.double(), s64, rtol=2**-22, atol=0)
    t = x.double() / s64.clamp(min=1e-30).unsqueeze(-1)
    q = unpack_words(y).double()
    far = ~_near_half(t, 1e-4)
    assert torch.equal(q[far], torch.round(t).clamp(-8, 7)[far]) and int(q[4].abs().max()) == 0
    with pytest.raises(RuntimeError, match="multiple of 8"):
        emu.npu_dynamic_quant(x[:, :60], dst_type=torch.quint4x2)


@pytest.mark.parametrize("layout", ["kn", "nk-t"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_quant_matmul_int4_formula(layout, out_dtype):
    m, k, n = 5, 64, 24
    g = gen(3)
    a = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int32)
    b = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int32)
    x1 = emu.npu_convert_weight_to_int4pack(a)  # (m, k/8)
    if layout == "kn":
        x2 = emu.npu_convert_weight_to_int4pack(b)  # (k, n/8)
    else:  # the transpose of a contiguous (n, k/8), as vLLM-Ascend passes its weights
        x2 = emu.npu_convert_weight_to_int4pack(b.t().contiguous()).t()
    scale = torch.rand(n, generator=g) * 1e-2 + 1e-3
    pt = torch.rand(m, generator=g) * 0.1 + 1e-2
    out = emu.npu_quant_matmul(x1, x2, scale, pertoken_scale=pt, output_dtype=out_dtype)
    ref = (a.double() @ b.double()) * scale.double() * pt.double().unsqueeze(1)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert float(((out.double() - ref).abs() - 2 * UNIT_ROUNDOFF[out_dtype] * ref.abs()).max()) <= 1e-6
    # fp16 output without pertoken_scale: int32 bias, the int64 of npu_trans_quant_param, read as FP19
    # (table 2's first int4 row; a float32 scale there is refused, as aclnn's A4W4 check does)
    bias = torch.randint(-50, 50, (n,), generator=g, dtype=torch.int32)
    out = emu.npu_quant_matmul(
        x1, x2, emu.npu_trans_quant_param(scale), bias=bias, output_dtype=torch.float16
    )
    ref = (a.double() @ b.double() + bias.double()) * emu._fp19(scale).double()
    assert float(((out.double() - ref).abs() - 2**-10 * ref.abs()).max()) <= 1e-6
    with pytest.raises(TypeError, match="npu_trans_quant_param"):
        emu.npu_quant_matmul(x1, x2, scale, bias=bias, output_dtype=torch.float16)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("float bias with pertoken", TypeError, "unsupported dtype combination"),
        ("bf16 without pertoken", TypeError, "unsupported dtype combination"),
        ("x1 not contiguous", RuntimeError, "contiguous"),
        ("weight not packed along a contiguous dim", RuntimeError, "contiguous"),
        ("K differs", RuntimeError, "K of x1"),
        ("int8 x int4", NotImplementedError, "A8W4"),
    ],
)
def test_quant_matmul_int4_misuse(case, exc, match):
    g = gen(4)
    x1 = emu.npu_convert_weight_to_int4pack(torch.randint(-8, 8, (4, 64), generator=g, dtype=torch.int32))
    w = emu.npu_convert_weight_to_int4pack(torch.randint(-8, 8, (16, 64), generator=g, dtype=torch.int32)).t()
    scale, pt = torch.rand(16, generator=g), torch.rand(4, generator=g)
    kw = dict(pertoken_scale=pt, output_dtype=torch.bfloat16)
    if case == "float bias with pertoken":
        kw["bias"] = torch.zeros(16)
    elif case == "bf16 without pertoken":
        kw.pop("pertoken_scale")
    elif case == "x1 not contiguous":
        x1 = torch.cat([x1, x1], dim=1)[:, ::2]
    elif case == "weight not packed along a contiguous dim":
        w = torch.cat([w, w], dim=1)[:, ::2]
    elif case == "K differs":
        x1 = x1[:, :4].contiguous()
    elif case == "int8 x int4":
        x1 = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(exc, match=match):
        emu.npu_quant_matmul(x1, w, scale, **kw)


# -- kernels against the float64 reference -----------------------------------------------------
def orthogonal_ish(n: int, g: torch.Generator) -> torch.Tensor:
    """A well-conditioned, non-symmetric matrix (FlatQuant's transforms start orthogonal)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q + 0.2 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5


def make_layer(dtype, out_f, kron, weight_bits, clip, bias, seed=0):
    n1, n2 = kron
    in_f = n1 * n2
    g = gen(seed)
    layer = torch.nn.Module()
    layer.prefix = PREFIX
    layer.params_dtype = dtype
    layer.logical_widths = [out_f]
    layer.input_size_per_partition, layer.output_size_per_partition = in_f, out_f
    hi = 1 << (weight_bits - 1)
    w = torch.randint(-hi, hi, (out_f, in_f), generator=g, dtype=torch.int8)
    w_scale = (torch.rand(out_f, 1, generator=g) + 0.5) * (0.2 / hi)
    layer.register_parameter("weight", torch.nn.Parameter(w, requires_grad=False))
    layer.register_parameter("weight_scale", torch.nn.Parameter(w_scale, requires_grad=False))
    # factors as a checkpoint holds them: values representable in the model dtype
    left = orthogonal_ish(n1, g).to(dtype).float()
    right = orthogonal_ish(n2, g).to(dtype).float()
    b = (torch.randn(out_f, generator=g) * 0.5).to(dtype) if bias else None
    ref = {"w": w.double(), "w_scale": w_scale.double().reshape(-1), "bias": b}
    ref["left"], ref["right"] = left.double(), right.double()
    ref["transform"] = OnlineKronecker(left, right, clip)
    return layer, ref


def make_input(m, in_f, dtype, seed=1):
    g = gen(seed)
    x = torch.randn(m, in_f, generator=g) * 2
    x[:, torch.randperm(in_f, generator=g)[:3]] *= 8  # outlier channels, so clipping bites
    if m > 2:
        x[m // 2] = 0  # an all-zero token
    return x.to(dtype)


def reference(x, ref, spec: IntDynamicSpec, clip: float):
    """The scheme in float64: (t = x'' / s before rounding, q, s [m], max|x''| [m], the output without
    bias, x'', and for the error model |L^T| |X| |R| and |L^T| |X R|)."""
    x64 = x.double()
    qmax = spec.act_qmax
    if spec.kronecker is not None:
        n1, n2 = spec.kronecker
        x3 = x64.reshape(-1, n1, n2)
        xt = (ref["left"].t() @ x3 @ ref["right"]).reshape(x64.shape)
        absx = ref["left"].t().abs() @ x3.abs() @ ref["right"].abs()
        absxr = ref["left"].t().abs() @ (x3 @ ref["right"]).abs()
        bounds = {"abs": absx.reshape(x64.shape), "abs_l_xr": absxr.reshape(x64.shape)}
    else:
        xt, clip = x64, 1.0
        bounds = {"abs": x64.abs(), "abs_l_xr": x64.abs()}
    amax = xt.abs().amax(dim=-1, keepdim=True)
    s = clip * amax / qmax
    t = torch.where(s > 0, xt / torch.where(s > 0, s, 1), 0)
    q = torch.round(t).clamp(-qmax - 1, qmax)
    mm = (q @ ref["w"].t()) * s * ref["w_scale"]
    return t, q, s.reshape(-1), amax.reshape(-1), mm, xt, bounds


def make_kernel(platform, layer, weight_bits, act_bits, transform, kron=None):
    """The kernel ``platform`` chooses for the layer (built for ``kron``, else the transform's sizes),
    with the transform's factors handed over and its weights processed."""
    in_f, out_f = layer.input_size_per_partition, layer.output_size_per_partition
    shape = LayerShape(in_f, out_f, in_f, (out_f,), layer.params_dtype)
    kron = kron or (None if transform is None else transform.sizes)
    spec = IntDynamicSpec(weight_bits, act_bits, kron)
    kernel = choose_kernel(KernelConfig(spec, shape, PREFIX), platform=platform)
    kernel.set_transform(transform)
    kernel.process_weights_after_loading(layer)
    return kernel


def route(kernel) -> str:
    return "kronecker" if isinstance(kernel, npu_kernels.NpuKroneckerKernel) else kernel.name


def _deltas(path, spec, dtype, t, s, amax, xt, bounds):
    """Per-element bound (in q units) on |t_kernel - t_ref| and per-token relative scale error."""
    n1, n2 = spec.kronecker or (1, 1)
    gamma = (n1 + n2 + 2) * 2.0**-24  # float32 accumulation of the two small matmuls
    if spec.kronecker is None:
        err = torch.zeros_like(xt)
    elif path == "kronecker":
        # x @ R stored in x's dtype, L^T @ (.) stored in float16 (flat_quant_cube.h)
        err = UNIT_ROUNDOFF[dtype] * bounds["abs_l_xr"] + 2.0**-11 * xt.abs() + 2 * gamma * bounds["abs"]
    else:  # the transform in float32, in torch
        err = 2 * gamma * bounds["abs"]
    err = 1.1 * err
    safe_amax = torch.where(amax > 0, amax, 1)
    rho = err.amax(dim=-1) / safe_amax + 2.0**-21  # relative error of max|x| (and float32 scale ops)
    # kronecker: the scaled value is rounded to float16 before it is rounded to an integer;
    # otherwise float32 division
    u_final = 2.0**-11 if path == "kronecker" else 2.0**-22
    safe_s = torch.where(s > 0, s, 1).unsqueeze(-1)
    delta = 1.1 * (err / safe_s + t.abs() * (rho.unsqueeze(-1) + u_final)) + 2.0**-20
    return delta, rho


def kernel_q(x_q: torch.Tensor, in_f: int) -> torch.Tensor:
    return (unpack_words(x_q) if x_q.dtype == torch.int32 else x_q.to(torch.int64)).double().reshape(-1, in_f)


def check_against_reference(kernel, ref, x, clip):
    spec, dtype = kernel.spec, kernel.config.params_dtype
    in_f = x.shape[1]
    x_q, x_scale = kernel.quantize_input(x)
    out = kernel.mm(x_q, x_scale, ref["bias"], dtype)
    t, q_ref, s_ref, amax, mm_ref, xt, bounds = reference(x, ref, spec, clip)
    delta, rho = _deltas(route(kernel), spec, dtype, t, s_ref, amax, xt, bounds)
    rho = 1.1 * rho
    # q: exact wherever the path's error cannot cross a rounding boundary (or the clamp)
    qmax = spec.act_qmax
    lo = torch.round(t - delta).clamp(-qmax - 1, qmax)
    hi = torch.round(t + delta).clamp(-qmax - 1, qmax)
    safe = lo == hi
    q = kernel_q(x_q, in_f)
    assert torch.equal(q[safe], q_ref[safe])
    assert float((q - q_ref).abs().max()) <= 1
    assert float(safe.double().mean()) > 0.6  # the check is not vacuous
    # per-token scale
    s = x_scale.double().reshape(-1)
    assert bool(((s - s_ref).abs() <= rho * s_ref + 1e-9).all())
    # the matmul and epilogue, element by element, against the kernel's own q and scale: only the
    # float32 epilogue and the output dtype's rounding (product, then bias) remain
    bias = torch.zeros(mm_ref.shape[1], dtype=torch.float64) if ref["bias"] is None else ref["bias"].double()
    u = UNIT_ROUNDOFF[dtype]
    mm_own = (q @ ref["w"].t()) * s.unsqueeze(1) * ref["w_scale"]
    excess = (out.double() - mm_own - bias).abs() - (
        1.01 * (2 * u + 2.0**-20) * (mm_own.abs() + bias.abs()) + 1e-7
    )
    assert float(excess.max()) <= 0, f"epilogue: max excess {float(excess.max())}"
    # output against the reference, element by element
    unsafe_w = (~safe).double() @ ref["w"].abs().t()  # sum over flippable positions of |q_w|
    p_ref = (q_ref @ ref["w"].t()).abs()
    scale_ij = s_ref.unsqueeze(1) * ref["w_scale"]
    dev = scale_ij * ((1 + rho.unsqueeze(1)) * unsafe_w + rho.unsqueeze(1) * p_ref)
    tol = 1.01 * (dev + 2 * u * (mm_ref.abs() + bias.abs() + dev)) + 1e-7
    out_ref = mm_ref + bias
    assert out.dtype == dtype and out.shape == out_ref.shape
    excess = (out.double() - out_ref).abs() - tol
    assert float(excess.max()) <= 0, f"max excess {float(excess.max())}"
    return out


COMBOS = [(4, 4, False), (4, 4, True), (4, 8, True), (8, 8, True)]
SHAPES = {"decode": (1, (8, 16), 40), "prefill": (517, (16, 16), 96)}


@pytest.fixture(params=["npu", "torch"])
def platform(request, monkeypatch):
    if request.param == "npu":
        use_npu_emulation(monkeypatch)
    return request.param


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("combo", COMBOS, ids=[f"W{w}A{a}{'-kron' if k else ''}" for w, a, k in COMBOS])
def test_matches_float64_reference(platform, combo, dtype, bias, shape):
    weight_bits, act_bits, transform = combo
    m, kron, out_f = SHAPES[shape]
    clip = 0.9 if transform else 1.0
    layer, ref = make_layer(dtype, out_f, kron, weight_bits, clip, bias)
    kernel = make_kernel(platform, layer, weight_bits, act_bits, ref["transform"] if transform else None)
    expect = {
        (4, 4, False): "NpuDynamicInt4Kernel",
        (4, 4, True): "NpuKroneckerKernel",
        # transform and quantization in torch, then the int8 matmul
        (4, 8, True): "TorchIntDynamicKernel(NpuInt8Kernel)",
        (8, 8, True): "TorchIntDynamicKernel(NpuInt8Kernel)",
    }[combo]
    assert kernel.name == (expect if platform == "npu" else "TorchIntDynamicKernel(TorchInt8Kernel)")
    x = make_input(m, kron[0] * kron[1], dtype)
    check_against_reference(kernel, ref, x, clip)


def test_prepared_layout(monkeypatch):
    use_npu_emulation(monkeypatch)
    dtype = torch.bfloat16
    layer, ref = make_layer(dtype, 40, (8, 16), 4, 0.9, False)
    kernel = make_kernel("npu", layer, 4, 4, ref["transform"])
    w = kernel.weight  # as vllm-ascend: int4pack of [out, in], transposed view (in/8, out)
    assert w.dtype == torch.int32 and w.shape == (16, 40) and w.t().is_contiguous()
    assert torch.equal(unpack_words(w.t()), ref["w"].to(torch.int64))
    assert kernel.w_scale.dtype == torch.float32 and kernel.w_scale.shape == (40,)
    assert kernel.p1.dtype == dtype and torch.equal(kernel.p1.double(), ref["left"].t())
    assert torch.equal(kernel.p2.double(), ref["right"])
    assert layer.weight is None and layer.weight_scale is None
    layer, ref = make_layer(dtype, 40, (8, 16), 4, 0.9, False)
    gemm = make_kernel("npu", layer, 4, 8, ref["transform"]).gemm
    assert gemm.weight.dtype == torch.int8 and gemm.weight.shape == (128, 40)
    assert emu.get_npu_format(gemm.weight) == emu.ACL_FORMAT_FRACTAL_NZ


def test_kronecker_quant_is_chunked(monkeypatch):
    use_npu_emulation(monkeypatch)
    dtype = torch.float16
    kron = (8, 16)
    x = make_input(21, 128, dtype, seed=5)
    layer, ref = make_layer(dtype, 40, kron, 4, 0.9, True)
    kernel = make_kernel("npu", layer, 4, 4, ref["transform"])
    whole_q, whole_s = kernel.quantize_input(x)  # one call
    calls = []
    real = emu.npu_kronecker_quant

    def counting(x3, *args, **kwargs):
        calls.append(x3.shape[0])
        return real(x3, *args, **kwargs)

    monkeypatch.setattr(emu, "npu_kronecker_quant", counting)
    monkeypatch.setattr(emu, "KRONECKER_MAX_K", 8)  # the op now refuses more than 8 tokens
    with pytest.raises(RuntimeError, match=r"first dim of x must lie in \[1, 8\]"):
        kernel.quantize_input(x)
    calls.clear()
    monkeypatch.setattr(npu_kernels, "KRONECKER_QUANT_MAX_BATCH_SIZE", 8)
    q, s = kernel.quantize_input(x)
    assert calls == [8, 8, 5]
    assert torch.equal(q, whole_q) and torch.equal(s, whole_s) and q.shape == (21, 16)
    check_against_reference(kernel, ref, x, 0.9)


@pytest.mark.parametrize(
    "case,kron,out_f,weight_bits,act_bits,warning",
    [
        ("n2 not a multiple of 8", (16, 12), 48, 4, 4, "does not take a 16 x 12"),
        ("out features not a multiple of 8", (8, 16), 44, 4, 4, "multiples of 8"),
        ("int8 weights, 4-bit activations", (8, 16), 40, 8, 4, "8-bit weights"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_routes_the_kernels_do_not_take(
    monkeypatch, caplog, case, kron, out_f, weight_bits, act_bits, warning, dtype
):
    """The portable transform and quantization, then the NPU's int8 matmul, with a warning naming
    the layer and every NPU kernel's reason."""
    use_npu_emulation(monkeypatch)
    layer, ref = make_layer(dtype, out_f, kron, weight_bits, 0.9, True)
    with caplog.at_level(logging.WARNING, logger="vllm_ptq_ascend.kernels"):
        kernel = make_kernel("npu", layer, weight_bits, act_bits, ref["transform"])
    assert kernel.name == "TorchIntDynamicKernel(NpuInt8Kernel)"
    assert PREFIX in caplog.text and warning in caplog.text and "NpuKroneckerKernel" in caplog.text
    x = make_input(33, kron[0] * kron[1], dtype, seed=7)
    check_against_reference(kernel, ref, x, 0.9)


@pytest.mark.parametrize(
    "case,match",
    [
        ("float32 layer", r"down_proj.*float16/bfloat16"),
        ("transform does not match the layer", r"down_proj.*does not match 128 input features"),
        ("int4 weight values out of range", r"down_proj.*\[-8, 7\]"),
        ("clip ratio not positive", r"down_proj.*clip ratio must be positive"),
        ("clip ratio above 1", r"down_proj.*npu_kronecker_quant does not take clip ratio 1.5"),
    ],
)
def test_bad_layers_refused_at_load(monkeypatch, case, match):
    use_npu_emulation(monkeypatch)
    dtype = torch.float32 if case == "float32 layer" else torch.bfloat16
    layer, ref = make_layer(dtype, 40, (8, 16), 4, 0.9, False)
    t = ref["transform"]
    if case == "transform does not match the layer":
        t = OnlineKronecker(torch.eye(4), t.right, t.clip_ratio)
    elif case == "int4 weight values out of range":
        layer.weight.data[0, 0] = 9
    elif case == "clip ratio not positive":
        t = OnlineKronecker(t.left, t.right, 0.0)
    elif case == "clip ratio above 1":
        t = OnlineKronecker(t.left, t.right, 1.5)
    with pytest.raises(ValueError, match=match):
        make_kernel("npu", layer, 4, 4, t, kron=(8, 16))
