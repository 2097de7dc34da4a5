"""The GPU lists' W4A4 / FlatQuant activation kernel (kernels/triton_quant.py): its Triton code run by
Triton's own interpreter on this CPU host (TRITON_INTERPRET=1, in a child process, since Triton reads
it when a kernel is defined) against a float64 reference, and where the candidate lists place it.
Its speed on a GPU is in benchmarks/results/cuda_gemm.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_ptq_ascend.kernels import IntDynamicSpec, KernelConfig, LayerShape, choose_kernel, triton_quant

pytest.importorskip("triton")

CHILD = textwrap.dedent(
    """
    import json, torch
    from vllm_ptq_ascend.kernels import (IntDynamicSpec, KernelConfig, LayerShape, OnlineKronecker,
                                         choose_kernel, triton_quant)

    def orthogonal_ish(n, g):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return (q + 0.2 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5).float()

    def reference(x, left, right, clip, qmax):
        x64 = x.double()
        if left is not None:
            n1, n2 = left.shape[0], right.shape[0]
            x64 = (left.double().t() @ x64.reshape(-1, n1, n2) @ right.double()).reshape(x64.shape)
        s = clip * x64.abs().amax(-1, keepdim=True) / qmax
        t = torch.where(s > 0, x64 / torch.where(s > 0, s, 1), 0)
        return t.clamp(-qmax - 1, qmax), s

    g = torch.Generator().manual_seed(0)
    cases = []
    for n1, n2 in [(4, 16), (6, 20), (24, 24), (None, 96), (None, 130)]:
        for qmax, clip in [(7, 0.9), (127, 1.0)]:
            for dtype in (torch.bfloat16, torch.float32):
                n = n2 * (n1 or 1)
                x = torch.randn(5, n, generator=g) * 3
                x[:, torch.randperm(n, generator=g)[:2]] *= 10  # outlier channels
                x[2] = 0  # an all-zero token
                x = x.to(dtype)
                left = orthogonal_ish(n1, g) if n1 else None
                right = orthogonal_ish(n2, g) if n1 else None
                q, s = triton_quant.transform_quant(x, left, right, clip if n1 else 1.0, qmax)
                t, s_ref = reference(x, left, right, clip if n1 else 1.0, qmax)
                nz = s_ref.reshape(-1) > 0
                cases.append({
                    "case": [n1, n2, qmax, clip, str(dtype)],
                    "dtypes": [str(q.dtype), str(s.dtype), list(q.shape), list(s.shape)],
                    "q_range": [int(q.min()), int(q.max())],
                    "max_round_dev": float((q.double() - t).abs().max()),
                    "max_scale_rel": float(((s.double() - s_ref) / s_ref)[nz].abs().max()),
                    "zero_row_q": int(q[2].abs().max()),
                    "zero_row_scale_finite": bool(torch.isfinite(s[2]).all() and s[2] > 0),
                })

    # a whole layer through the CUDA list (vLLM's int8 GEMM takes no pre-quantized input: torch's)
    n1, n2, out_f = 8, 16, 48
    w = torch.randint(-8, 8, (out_f, n1 * n2), generator=g, dtype=torch.int8)
    w_scale = torch.rand(out_f, 1, generator=g) * 0.01 + 1e-3
    layer = torch.nn.Module()
    layer.register_parameter("weight", torch.nn.Parameter(w, requires_grad=False))
    layer.register_parameter("weight_scale", torch.nn.Parameter(w_scale, requires_grad=False))
    layer.params_dtype, layer.logical_widths = torch.bfloat16, [out_f]
    layer.input_size_per_partition, layer.output_size_per_partition = n1 * n2, out_f
    shape = LayerShape(n1 * n2, out_f, n1 * n2, (out_f,), torch.bfloat16)
    kernel = choose_kernel(KernelConfig(IntDynamicSpec(4, 4, (n1, n2)), shape, "L"), platform="cuda")
    left, right = orthogonal_ish(n1, g), orthogonal_ish(n2, g)
    kernel.set_transform(OnlineKronecker(left, right, 0.9))
    kernel.process_weights_after_loading(layer)
    x = (torch.randn(6, n1 * n2, generator=g) * 2).to(torch.bfloat16)
    out = kernel.apply(layer, x, None).double()
    t, s = reference(x, left, right, 0.9, 7)
    ref = (torch.round(t) * s) @ (w.double() * w_scale.double()).t()
    print(json.dumps({"cases": cases, "layer": {"name": kernel.name,
                      "rel_err": float((out - ref).norm() / ref.norm())}}))
    """
)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_interpreted_kernel_quantizes_every_token_as_float64_does(interpreted):
    """Each integer is a nearest rounding of the float64 value (ties either way, as float32 scale
    arithmetic breaks them), each scale is the float64 one to float32 precision, and an all-zero token
    gets zeros and a finite scale: with and without a transform, padded factor sizes, 4 and 8 bits."""
    assert len(interpreted["cases"]) == 20
    for c in interpreted["cases"]:
        qmax = c["case"][2]
        assert c["dtypes"][:2] == ["torch.int8", "torch.float32"], c
        assert c["dtypes"][3] == [c["dtypes"][2][0], 1], c
        assert -qmax - 1 <= c["q_range"][0] and c["q_range"][1] <= qmax, c
        assert c["max_round_dev"] <= 0.5 + 1e-4, c
        assert c["max_scale_rel"] < 1e-6, c
        assert c["zero_row_q"] == 0 and c["zero_row_scale_finite"], c


def test_the_cuda_list_serves_flatquant_with_it(interpreted):
    assert interpreted["layer"]["name"] == "TritonIntDynamicKernel(TorchInt8Kernel)"
    assert interpreted["layer"]["rel_err"] < 1e-2


def _config(platform: str, kron=(64, 64)) -> KernelConfig:
    n = kron[0] * kron[1] if kron else 4096
    shape = LayerShape(n, 256, n, (256,), torch.bfloat16)
    return KernelConfig(IntDynamicSpec(4, 4, kron), shape, "L", platform)


def test_without_a_gpu_the_gpu_lists_fall_back_to_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_quant.triton_can_run.cache_clear()
    try:
        ok, why = triton_quant.TritonIntDynamicKernel.can_implement(_config("cuda"))
        assert not ok and "no GPU" in why
        assert choose_kernel(_config("cuda")).name == "TorchIntDynamicKernel"
    finally:
        triton_quant.triton_can_run.cache_clear()


def test_refusals_name_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_quant.triton_can_run.cache_clear()
    try:
        assert triton_quant.TritonIntDynamicKernel.can_implement(_config("cuda")) == (True, None)
        ok, why = triton_quant.TritonIntDynamicKernel.can_implement(_config("cpu"))
        assert not ok and "not cpu" in why
        ok, why = triton_quant.TritonIntDynamicKernel.can_implement(_config("cuda", (16, 200)))
        assert not ok and "16 x 200" in why
    finally:
        triton_quant.triton_can_run.cache_clear()


WITHOUT_VLLM = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoVllm(importlib.abc.MetaPathFinder):  # a GPU machine with torch and Triton, no vLLM build
        def find_spec(self, name, path, target=None):
            if name == "vllm" or name.startswith("vllm."):
                raise ImportError(f"no vLLM here ({name})")

    sys.meta_path.insert(0, NoVllm())
    import torch
    from vllm_ptq_ascend.kernels import IntDynamicSpec, KernelConfig, LayerShape, choose_kernel

    layer = torch.nn.Module()
    w = torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    layer.register_parameter("weight", torch.nn.Parameter(w, requires_grad=False))
    scale = torch.nn.Parameter(torch.full((32, 1), 0.01), requires_grad=False)
    layer.register_parameter("weight_scale", scale)
    layer.params_dtype, layer.logical_widths = torch.float32, [32]
    layer.input_size_per_partition, layer.output_size_per_partition = 64, 32
    spec, shape = IntDynamicSpec(4, 4), LayerShape(64, 32, 64, (32,), torch.float32)  # W4A4
    kernel = choose_kernel(KernelConfig(spec, shape, "L"), platform="cuda")
    kernel.process_weights_after_loading(layer)
    x = torch.randn(3, 64)
    s = x.abs().amax(-1, keepdim=True) / 7
    ref = (torch.round(x / s).clamp(-8, 7) * s).double() @ (w.double() * 0.01).t()
    out = kernel.apply(layer, x, None).double()
    print(kernel.name, float((out - ref).norm() / ref.norm()))
    """
)


def test_the_gpu_lists_portable_kernels_need_no_vllm():
    """benchmarks/cuda_gemm.py runs on GPU machines that have torch and Triton but no vLLM build: the
    GPU lists' kernels for layers vLLM has no kernel for must build and run there."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_VLLM], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    name, err = run.stdout.split()
    assert name == "TritonIntDynamicKernel(TorchInt8Kernel)" and float(err) < 1e-6
