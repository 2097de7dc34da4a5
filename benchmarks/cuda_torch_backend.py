"""The portable torch kernels on a CUDA GPU: exactness and GEMM timings at 7B shapes.

No vLLM engine is needed: each layer is a plain module carrying the tensors a scheme
registers (checkpoint layout), handed to the kernel the "torch" candidate lists choose
(``choose_kernel(..., platform="torch")``), exactly as the schemes do.
It checks every W8A8 / W4A16 variant against the float64 reference of tests/, then
times W8A8 (torch._int_mm) and W4A16 (dequantized at load) against bf16 at
Llama-2-7B linear shapes, and the share of W8A8 time spent quantizing activations.
This measures the *fallback* kernels; on CUDA the layers get vLLM's own kernels first
(kernels/vllm_linear.py), which this script does not time.

    python benchmarks/cuda_torch_backend.py [OUT_DIR]
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import cuda_us_per_call as bench  # noqa: E402
from reference import dequant_weight, pack_int32, quant_per_token, quant_static  # noqa: E402

from vllm_ptq_ascend.kernels import KernelConfig, LayerShape, choose_kernel  # noqa: E402
from vllm_ptq_ascend.kernels.base import Int8LinearSpec, WeightOnlySpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES_7B = {
    "qkv_proj": (12288, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (22016, 4096),
    "down_proj": (4096, 11008),
}


def layer_with(tensors: dict, out_f: int, in_f: int, dtype) -> torch.nn.Module:
    layer = torch.nn.Module()
    for k, v in tensors.items():
        layer.register_parameter(k, torch.nn.Parameter(v.to(DEV), requires_grad=False))
    layer.logical_widths = [out_f]
    layer.params_dtype = dtype
    layer.input_size_per_partition = in_f
    layer.output_size_per_partition = out_f
    return layer


def torch_kernel(layer, spec, out_f: int, in_f: int, dtype):
    """The portable kernel for ``spec``, with the layer's tensors processed."""
    kernel = choose_kernel(KernelConfig(spec, LayerShape(in_f, out_f, in_f, (out_f,), dtype), "L"), "torch")
    kernel.process_weights_after_loading(layer)
    return kernel


def w8a8_case(out_f, in_f, static, symmetric, g):
    t = {
        "weight": torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8),
        "weight_scale": torch.rand(out_f, 1, generator=g) * 0.01 + 1e-3,
    }
    if static:
        t["input_scale"] = torch.tensor([0.02])
        if not symmetric:
            t["input_zero_point"] = torch.tensor([-7], dtype=torch.int8)
    return t


def wna16_case(out_f, in_f, bits, group, symmetric, act_order, g):
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (out_f, in_f), generator=g)
    n_groups = in_f // group if group else 1
    t = {
        "weight_packed": pack_int32(q, bits, 1),
        "weight_scale": torch.rand(out_f, n_groups, generator=g) * 0.02 + 1e-3,
    }
    if not symmetric:
        t["weight_zero_point"] = pack_int32(torch.randint(lo, hi, (out_f, n_groups), generator=g), bits, 0)
    if act_order:
        t["weight_g_idx"] = (torch.randperm(in_f, generator=g) // group).to(torch.int32)
    return t, q


def check_exactness() -> list[dict]:
    g, rows = torch.Generator().manual_seed(0), []
    for out_f, in_f in [(256, 512), (40, 96), (33, 72)]:
        for m in (1, 7, 40):
            for static, sym in [(False, True), (True, True), (True, False)]:
                t = w8a8_case(out_f, in_f, static, sym, g)
                layer = layer_with(t, out_f, in_f, torch.bfloat16)
                kernel = torch_kernel(layer, Int8LinearSpec(True, static, sym), out_f, in_f, torch.bfloat16)
                x = torch.randn(m, in_f, generator=g)
                xq, xs, xzp = kernel.quantize_input(x.to(DEV, torch.bfloat16))
                out = kernel.mm(xq, xs, xzp, None, torch.float32).cpu().double()
                w = dequant_weight({f"L.{k}": v for k, v in t.items()}, "L", {"num_bits": 8})
                xb = x.to(torch.bfloat16).double()
                zp = int(t.get("input_zero_point", torch.tensor([0]))) if static else 0
                xr = quant_static(xb, 0.02, zp) if static else quant_per_token(xb)
                ref = xr @ w.t()
                err = float((out - ref).norm() / ref.norm())
                rows.append(
                    {
                        "scheme": f"w8a8 {'static' if static else 'dynamic'} {'sym' if sym else 'asym'}",
                        "shape": [m, out_f, in_f],
                        "rel_err": err,
                    }
                )
        for bits, group, sym, ao in [
            (4, 32, True, False),
            (4, 32, False, False),
            (8, None, False, False),
            (4, 32, True, True),
        ]:
            if group and in_f % group:
                continue
            t, _ = wna16_case(out_f, in_f, bits, group, sym, ao, g)
            t["weight_shape"] = torch.tensor([out_f, in_f])
            layer = layer_with(
                {k: v for k, v in t.items() if k != "weight_shape"}, out_f, in_f, torch.float32
            )
            spec = WeightOnlySpec(bits, group or -1, sym, ao)
            kernel = torch_kernel(layer, spec, out_f, in_f, torch.float32)
            x = torch.randn(5, in_f, generator=g)
            out = kernel.apply(layer, x.to(DEV), None).cpu().double()
            ref = (
                x.double() @ dequant_weight({f"L.{k}": v for k, v in t.items()}, "L", {"num_bits": bits}).t()
            )
            rows.append(
                {
                    "scheme": f"w{bits}a16 g{group or 'channel'} {'sym' if sym else 'zp'}"
                    + (" act-order" if ao else ""),
                    "shape": [5, out_f, in_f],
                    "rel_err": float((out - ref).norm() / ref.norm()),
                }
            )
    return rows


def timings() -> list[dict]:
    g, rows = torch.Generator().manual_seed(1), []
    for name, (out_f, in_f) in SHAPES_7B.items():
        w8 = layer_with(w8a8_case(out_f, in_f, False, True, g), out_f, in_f, torch.bfloat16)
        k8 = torch_kernel(w8, Int8LinearSpec(True, False, True), out_f, in_f, torch.bfloat16)
        t4, _ = wna16_case(out_f, in_f, 4, 128, True, False, g)
        w4 = layer_with(t4, out_f, in_f, torch.bfloat16)
        k4 = torch_kernel(w4, WeightOnlySpec(4, 128, True, False), out_f, in_f, torch.bfloat16)
        wb = torch.randn(out_f, in_f, device=DEV, dtype=torch.bfloat16)
        for m in (1, 16, 2048):
            x = torch.randn(m, in_f, device=DEV, dtype=torch.bfloat16)
            t_bf16 = bench(lambda x=x, wb=wb: torch.nn.functional.linear(x, wb))
            t_quant = bench(lambda x=x, k8=k8: k8.quantize_input(x))
            t_w8a8 = bench(lambda x=x, k8=k8, w8=w8: k8.apply(w8, x, None))
            t_w4 = bench(lambda x=x, k4=k4, w4=w4: k4.apply(w4, x, None))
            rows.append(
                {
                    "layer": name,
                    "m": m,
                    "n": out_f,
                    "k": in_f,
                    "bf16_us": t_bf16,
                    "w8a8_us": t_w8a8,
                    "w8a8_speedup": t_bf16 / t_w8a8,
                    "act_quant_share": t_quant / t_w8a8,
                    "w4a16_us": t_w4,
                    "w4a16_speedup": t_bf16 / t_w4,
                }
            )
    return rows


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    exact = check_exactness()
    worst = max(r["rel_err"] for r in exact)
    times = timings()
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    lines = [
        f"# Portable torch backend on {info['device']} ({info['date']}, torch {info['torch']})",
        "",
        f"Exactness: {len(exact)} cases (W8A8 dynamic/static sym/asym, "
        "W4A16/W8A16 group/channel/zp/act-order, odd shapes), "
        f"worst relative error vs float64 reference {worst:.2e}.",
        "",
        "| layer | M | N x K | bf16 us | W8A8 us | W8A8 speed-up | act-quant share "
        "| W4A16 us | W4A16 speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in times:
        lines.append(
            f"| {r['layer']} | {r['m']} | {r['n']}x{r['k']} | {r['bf16_us']:.1f} | {r['w8a8_us']:.1f} | "
            f"{r['w8a8_speedup']:.2f}x | {100 * r['act_quant_share']:.0f}% | {r['w4a16_us']:.1f} | "
            f"{r['w4a16_speedup']:.2f}x |"
        )
    lines += [
        "",
        "W4A16 here is dequantized at load (the fallback): bf16 speed and bf16 memory by design. "
        "W8A8 uses torch._int_mm (int32 accumulation) with unfused quantize/dequantize in torch.",
    ]
    md = "\n".join(lines)
    print(md)
    (out_dir / "cuda_torch_backend.md").write_text(md + "\n")
    (out_dir / "cuda_torch_backend.json").write_text(
        json.dumps({"info": info, "exactness": exact, "timings": times}, indent=2)
    )
    assert worst < 2e-2, f"torch backend inexact on CUDA: {worst}"


if __name__ == "__main__":
    main()
