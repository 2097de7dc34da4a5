"""Each scheme, through a real vLLM linear layer and each kernel backend, against a float64 reference.

The "npu" backend runs on the pure-torch emulation of torch_npu in tests/npu_emulation (no NPU here).
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
from tests.npu_helpers import use_npu_emulation
from tests.reference import dequant_weight, quant_per_token, quant_static

# (out, in): a kernel-friendly shape and odd ones that force the fallbacks.
SHAPES = [(128, 256), (40, 96), (33, 72)]
# Relative error budgets: fp32 differs from float64 only by accumulation order;
# bf16 outputs carry 8 mantissa bits (2^-8 ~ 0.4%), with activations rounded too; fp16 carries
# 11 (2^-11 ~ 0.05%), and the NPU's int64 (FP19) dequant scales 10, so a few roundings stay below 0.5%.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# the model dtypes each backend serves: the NPU ops take fp16/bf16 only; cpu/torch run fp32 and bf16
BACKEND_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "torch": (torch.float32, torch.bfloat16),
    "npu": (torch.bfloat16, torch.float16),
}


def pytest_generate_tests(metafunc):
    """Every case on every backend, in each model dtype that backend serves (no skipped pairs)."""
    if "dtype" in metafunc.fixturenames:
        pairs = [(b, d) for b, dtypes in BACKEND_DTYPES.items() for d in dtypes]
        ids = [f"{b}-{str(d).removeprefix('torch.')}" for b, d in pairs]
        metafunc.parametrize("backend_name,dtype", pairs, ids=ids)
    else:
        metafunc.parametrize("backend_name", list(BACKEND_DTYPES))


@pytest.fixture(autouse=True)
def backend(backend_name, monkeypatch):
    """Run every case on vLLM-CPU's kernels, the portable torch backend and the (emulated) NPU one."""
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, backend_name)
    if backend_name == "npu":
        use_npu_emulation(monkeypatch)
    return backend_name


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def run_layer(layer, x):
    layer.quant_method.process_weights_after_loading(layer)
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def ref_w8a8(x, tensors, acts_static, symmetric):
    sd = {f"L.{k}": v for k, v in tensors.items()}
    w = dequant_weight(sd, "L", {"num_bits": 8})
    x64 = x.double()
    if not acts_static:
        xq = quant_per_token(x64)
    else:
        zp = int(tensors["input_zero_point"]) if not symmetric else 0
        xq = quant_static(x64, float(tensors["input_scale"]), zp)
    return xq @ w.t()


@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("mode", ["dynamic", "static-sym", "static-asym", "static-sym-pertensor-weights"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_w8a8(vllm_dist, out_f, in_f, dtype, mode, m):
    static = mode.startswith("static")
    symmetric = "asym" not in mode
    per_channel = "pertensor" not in mode
    wargs, aargs = (
        W8A8_DYNAMIC if not static else w8a8_static(symmetric, "channel" if per_channel else "tensor")
    )
    layer = build_layer("ReplicatedLinear", ct_config(wargs, aargs), in_f, out_f, dtype, bias=False)
    tensors = make_w8a8_tensors(out_f, in_f, per_channel=per_channel, static=static, symmetric=symmetric)
    load_tensors(layer, tensors)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = run_layer(layer, x)
    assert out.dtype == dtype and out.shape == (m, out_f)
    ref = ref_w8a8(x, tensors, static, symmetric)
    assert rel_err(out, ref) < REL_TOL[dtype]


WNA16_VARIANTS = [  # bits, group (None: per channel), symmetric, act-order
    (4, 32, True, False),
    (4, 64, False, False),
    (4, 128, True, False),
    (4, None, True, False),
    (4, None, False, False),
    (8, 32, True, False),
    (8, None, False, False),
    (4, 32, True, True),  # GPTQ act-order (g_idx)
    (4, 32, False, True),
]
# every variant on every shape its group size divides (rejection is tested in test_bad_checkpoints)
WNA16_CASES = [(shape, v) for shape in SHAPES for v in WNA16_VARIANTS if not v[1] or shape[1] % v[1] == 0]


@pytest.mark.parametrize("shape,variant", WNA16_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_wna16(vllm_dist, shape, variant, dtype):
    (out_f, in_f), (bits, group, symmetric, act_order) = shape, variant
    cfg = ct_config(wna16(bits, group, symmetric, "group" if act_order else None))
    layer = build_layer("ReplicatedLinear", cfg, in_f, out_f, dtype, bias=True)
    tensors = make_wna16_tensors(out_f, in_f, bits, group, symmetric, act_order)
    tensors["weight_scale"] = tensors["weight_scale"].to(dtype)
    load_tensors(layer, tensors)
    bias = torch.randn(out_f).to(dtype)
    layer.bias.data.copy_(bias)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = run_layer(layer, x)
    sd = {f"L.{k}": v for k, v in tensors.items()}
    ref = x.double() @ dequant_weight(sd, "L", {"num_bits": bits}).t() + bias.double()
    assert out.dtype == dtype and out.shape == (5, out_f)
    assert rel_err(out, ref) < REL_TOL[dtype]


W4A8_GROUPS = [32, 8, None]  # None: per channel
W4A8_CASES = [(shape, gs) for shape in SHAPES for gs in W4A8_GROUPS if not gs or shape[1] % gs == 0]


@pytest.mark.parametrize("fmt", ["int-quantized", "pack-quantized"])
@pytest.mark.parametrize("shape,group", W4A8_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("m", [1, 9])
def test_w4a8(vllm_dist, shape, group, fmt, dtype, m):
    out_f, in_f = shape
    layer = build_layer("ReplicatedLinear", ct_config(*w4a8(group), fmt=fmt), in_f, out_f, dtype, bias=True)
    assert type(layer.scheme).__name__ == "W4A8IntScheme"
    tensors = make_w4a8_tensors(out_f, in_f, group, packed=fmt == "pack-quantized")
    load_tensors(layer, tensors)
    bias = torch.randn(out_f).to(dtype)
    layer.bias.data.copy_(bias)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = run_layer(layer, x)
    sd = {f"L.{k}": v for k, v in tensors.items()}
    w = dequant_weight(sd, "L", {"num_bits": 4})
    ref = quant_per_token(x.double()) @ w.t() + bias.double()
    assert out.dtype == dtype and out.shape == (m, out_f)
    assert rel_err(out, ref) < REL_TOL[dtype]
    # the activations really were quantized: unquantized activations are measurably elsewhere
    assert rel_err(x.double() @ w.t() + bias.double(), ref) > 1e-4
