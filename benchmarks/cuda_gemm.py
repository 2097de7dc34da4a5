"""Quantized linear layers on a CUDA GPU at Llama-2-7B shapes: vLLM's kernels and ours against bf16.

Issue 15's CUDA goals: W8A8 prefill-shaped GEMM at least 1.8x bf16, W4A16 batch-1 decode at least
3x, dynamic activation quantization at most 5% of linear time; FlatQuant / W4A4 through our kernels.

* vLLM's kernels: the Triton entries of vLLM's own CUDA candidate lists (vLLM 0.32.0's
  ``per_token_quant_int8`` + ``triton_scaled_mm`` for W8A8, ``triton_w4a16_gemm`` for W4A16),
  loaded verbatim from vLLM's source by ``vllm_triton_source.py``. The kernels ahead of them in
  those lists (cutlass, Machete, Marlin) are in vLLM's compiled ``_C`` library, which a GPU machine
  without a vLLM CUDA build cannot run; the table says so rather than guess their numbers.
* Ours (W4A4, FlatQuant): the kernel ``choose_kernel`` picks from the CUDA list (our Triton
  activation kernel, ``kernels/triton_quant.py``) and from the portable torch list, with the layer's
  tensors as a checkpoint holds them.

Every kernel is first checked against a float64 reference. Timings are CUDA events over 50 calls
after warm-up (microseconds per call).

    python benchmarks/cuda_gemm.py --vllm-src DIR [OUT_DIR]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vllm_triton_source  # noqa: E402
from common import cuda_us_per_call as bench  # noqa: E402
from reference import kron_rows, quant_per_token  # noqa: E402

from vllm_ptq_ascend.formats.kronecker import factor_sizes  # noqa: E402
from vllm_ptq_ascend.kernels import (  # noqa: E402
    IntDynamicSpec,
    KernelConfig,
    LayerShape,
    OnlineKronecker,
    choose_kernel,
)

DEV = "cuda"
SHAPES_7B = {  # layer: (N out, K in)
    "qkv_proj": (12288, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (22016, 4096),
    "down_proj": (4096, 11008),
}
GROUP = 128  # W4A16 group size
SPEEDUPS = ("w4a4_cuda", "w4a4_torch", "flatquant_cuda", "flatquant_torch", "flatquant_vllm_gemm")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    return float((out - ref).norm() / ref.norm())


# --- layers in the layouts the kernels take -------------------------------------------------------


def w8a8_weights(n: int, k: int, g: torch.Generator):
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    return w, scale


def w4a16_weights(n: int, k: int, g: torch.Generator):
    """Signed int4 [n, k] with per-group scales [n, k // GROUP], and vLLM's Triton layout of them
    (``TritonW4A16LinearKernel.process_weights_after_loading``: uint4b8, N packed 8 per int32)."""
    w = torch.randint(-8, 8, (n, k), generator=g)
    scale = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    u = (w + 8).t().contiguous().to(torch.int64)  # [k, n]
    packed = (u.reshape(k, n // 8, 8) << (torch.arange(8) * 4)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return w, scale, packed, scale.t().contiguous()


def our_layer(n: int, k: int, weight_bits: int, g: torch.Generator) -> torch.nn.Module:
    layer = torch.nn.Module()
    hi = 1 << (weight_bits - 1)
    w = torch.randint(-hi, hi, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, 1, generator=g) + 0.5) * (0.2 / hi)
    layer.register_parameter("weight", torch.nn.Parameter(w.to(DEV), requires_grad=False))
    layer.register_parameter("weight_scale", torch.nn.Parameter(scale.to(DEV), requires_grad=False))
    layer.params_dtype, layer.logical_widths = torch.bfloat16, [n]
    layer.input_size_per_partition, layer.output_size_per_partition = k, n
    layer.ref = (w.double(), scale.double().reshape(-1))
    return layer


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.to(torch.bfloat16).float()  # as a checkpoint holds it


def our_kernel(layer, n: int, k: int, act_bits: int, transform: OnlineKronecker | None, platform: str):
    """The kernel ``platform``'s list gives the layer: "cuda" (our Triton activation kernel, then the
    int8 GEMM for pre-quantized input, torch._int_mm) or "torch" (all in torch eager)."""
    spec = IntDynamicSpec(4, act_bits, None if transform is None else transform.sizes)
    shape = LayerShape(k, n, k, (n,), torch.bfloat16)
    kernel = choose_kernel(KernelConfig(spec, shape, "L"), platform=platform)
    if transform is not None:
        transform = OnlineKronecker(transform.left.to(DEV), transform.right.to(DEV), transform.clip_ratio)
    kernel.set_transform(transform)
    ref_w = layer.ref
    kernel.process_weights_after_loading(layer)
    return kernel, ref_w


def our_reference(x: torch.Tensor, ref_w, act_bits: int, transform: OnlineKronecker | None) -> torch.Tensor:
    """The scheme in float64 (tests/reference.py): transform, clip, per-token quantization, scales."""
    x64, clip = x.double().cpu(), 1.0
    if transform is not None:
        x64, clip = kron_rows(x64, transform.left, transform.right), transform.clip_ratio
    w, w_scale = ref_w
    return quant_per_token(x64, act_bits, clip) @ (w * w_scale.reshape(-1, 1)).t()


# --- exactness --------------------------------------------------------------------------------------


def check_exactness(vk) -> list[dict]:
    g, rows = torch.Generator().manual_seed(0), []
    for n, k in [(256, 512), (384, 1024)]:
        for m in (1, 7, 64):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            # vLLM W8A8: per-token int8 activations, per-channel int8 weights
            w, ws = w8a8_weights(n, k, g)
            xq, xs = vk.per_token_quant_int8(x.to(DEV))
            out = vk.triton_scaled_mm(xq, w.to(DEV).t(), xs, ws.to(DEV), torch.bfloat16)
            ref = quant_per_token(x.double()) @ (w.double() * ws.double()).t()
            rows.append(
                {"kernel": "vLLM triton W8A8 dynamic", "shape": [m, n, k], "rel_err": rel_err(out, ref)}
            )
            # vLLM W4A16 g128
            w4, sc, packed, sc_kn = w4a16_weights(n, k, g)
            out = vk._triton_w4a16_gemm_impl(x.to(DEV), packed.to(DEV), sc_kn.to(DEV), None, GROUP)
            ref = x.double() @ (w4.double() * sc.double().repeat_interleave(GROUP, 1)).t()
            rows.append(
                {"kernel": "vLLM triton W4A16 g128", "shape": [m, n, k], "rel_err": rel_err(out, ref)}
            )
            # ours: W4A4 and FlatQuant W4A4 (online Kronecker transform), W4A8 FlatQuant
            n1, n2 = factor_sizes(k)
            kron = OnlineKronecker(orthogonal(n1, g), orthogonal(n2, g), 0.9)
            for (label, act_bits, tr), platform in itertools.product(
                [("ours W4A4", 4, None), ("ours FlatQuant W4A4", 4, kron), ("ours FlatQuant W4A8", 8, kron)],
                ("cuda", "torch"),
            ):
                layer = our_layer(n, k, 4, g)
                kernel, ref_w = our_kernel(layer, n, k, act_bits, tr, platform)
                out = kernel.apply(layer, x.to(DEV), None)
                ref = our_reference(x, ref_w, act_bits, tr)
                rows.append(
                    {"kernel": f"{label} ({kernel.name})", "shape": [m, n, k], "rel_err": rel_err(out, ref)}
                )
    return rows


# --- timings ----------------------------------------------------------------------------------------


def timed(label: str, fn) -> float:
    """bench(fn), or NaN (printed) when the kernel fails there, so one shape does not lose the run."""
    try:
        return bench(fn)
    except Exception as e:
        print(f"{label}: {type(e).__name__}: {e}", flush=True)
        return float("nan")


def time_one_shape(vk, x: torch.Tensor, w: dict, ours: dict, label: str) -> dict[str, float]:
    xq, xs = vk.per_token_quant_int8(x)
    t = {
        "bf16": bench(lambda: torch.nn.functional.linear(x, w["bf16"])),
        "w8a8_quant": bench(lambda: vk.per_token_quant_int8(x)),
        "w8a8_gemm": bench(lambda: vk.triton_scaled_mm(xq, w["w8_t"], xs, w["w8_scale"], torch.bfloat16)),
        "w4a16": bench(lambda: vk._triton_w4a16_gemm_impl(x, w["w4_packed"], w["w4_scale"], None, GROUP)),
    }
    for (scheme, platform), (layer, kernel) in ours.items():
        key = f"{scheme}_{platform}"
        t[key] = timed(f"{label} {key}", lambda layer=layer, kernel=kernel: kernel.apply(layer, x, None))
        t[key + "_quant"] = timed(f"{label} {key}", lambda kernel=kernel: kernel.quantize_input(x))
    # our Triton activation kernel feeding vLLM's Triton int8 GEMM (scales in its epilogue)
    fq = ours["flatquant", "cuda"][1]

    def fused():
        x_q, x_scale = fq.quantize_input(x)
        return vk.triton_scaled_mm(x_q, fq.gemm.w_t, x_scale, fq.gemm.w_scale.reshape(-1, 1), torch.bfloat16)

    t["flatquant_vllm_gemm"] = timed(f"{label} flatquant_vllm_gemm", fused)
    return t


def timings(vk, ms: tuple[int, ...]) -> list[dict]:
    g, rows = torch.Generator().manual_seed(1), []
    for name, (n, k) in SHAPES_7B.items():
        w8, w8_scale = w8a8_weights(n, k, g)
        _, _, packed, sc_kn = w4a16_weights(n, k, g)
        w = {
            "bf16": torch.randn(n, k, generator=g).to(DEV, torch.bfloat16),
            "w8_t": w8.to(DEV).t(),  # [K, N] view of the [N, K] weight, as vLLM's kernel holds it
            "w8_scale": w8_scale.to(DEV),
            "w4_packed": packed.to(DEV),
            "w4_scale": sc_kn.to(DEV),
        }
        n1, n2 = factor_sizes(k)
        kron = OnlineKronecker(orthogonal(n1, g), orthogonal(n2, g), 0.9)
        ours = {}  # (scheme, platform list) -> (layer, kernel)
        schemes = (("w4a4", None), ("flatquant", kron))
        for (scheme, tr), platform in itertools.product(schemes, ("cuda", "torch")):
            layer = our_layer(n, k, 4, g)
            ours[scheme, platform] = layer, our_kernel(layer, n, k, 4, tr, platform)[0]
        for m in ms:
            x = torch.randn(m, k, generator=g).to(DEV, torch.bfloat16)
            t = time_one_shape(vk, x, w, ours, f"{name} M={m}")
            w8a8 = t["w8a8_quant"] + t["w8a8_gemm"]
            rows.append(
                {
                    "layer": name,
                    "m": m,
                    "n": n,
                    "k": k,
                    **{f"{key}_us": v for key, v in t.items()},
                    "w8a8_speedup": t["bf16"] / w8a8,
                    "w8a8_quant_share": t["w8a8_quant"] / w8a8,
                    "w4a16_speedup": t["bf16"] / t["w4a16"],
                    **{f"{key}_speedup": t["bf16"] / t[key] for key in SPEEDUPS},
                    **{f"{key}_quant_share": t[key + "_quant"] / t[key] for key in SPEEDUPS[:4]},
                }
            )
            print(f"{name} M={m}: " + ", ".join(f"{key} {v:.1f}" for key, v in t.items()), flush=True)
    return rows


def report(info: dict, exact: list[dict], times: list[dict]) -> str:
    worst: dict[str, float] = {}
    for r in exact:
        key = r["kernel"]
        worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    lines = [
        f"# Quantized linear kernels on {info['device']} ({info['date']})",
        "",
        f"torch {info['torch']}, Triton {info['triton']}; vLLM kernels from vLLM {info['vllm_src']}'s "
        "source (Triton entries of its CUDA candidate lists; cutlass / Machete / Marlin need vLLM's "
        "compiled `_C`, not available on this machine). Llama-2-7B linear shapes, microseconds per call "
        "(CUDA events, 50 calls), speed-up = bf16 time / quantized time (quantization of activations "
        "included).",
        "",
        "Exactness against float64 (worst relative error over 6 shapes):",
        "",
        "| kernel | worst rel. error |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2e} |" for k, v in worst.items()]
    lines += [
        "",
        "vLLM's kernels (W8A8: `per_token_quant_int8` + `triton_scaled_mm`; "
        "W4A16 g128: `triton_w4a16_gemm`):",
        "",
        "| layer | M | N x K | bf16 us | W8A8 us | x bf16 | act-quant share | W4A16 us | x bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in times:
        w8a8 = r["w8a8_quant_us"] + r["w8a8_gemm_us"]
        lines.append(
            f"| {r['layer']} | {r['m']} | {r['n']}x{r['k']} | {r['bf16_us']:.1f} | {w8a8:.1f} | "
            f"{r['w8a8_speedup']:.2f}x | {r['w8a8_quant_share']:.0%} | {r['w4a16_us']:.1f} | "
            f"{r['w4a16_speedup']:.2f}x |"
        )
    lines += [
        "",
        "Ours, W4A4 and FlatQuant W4A4 (x bf16, and in brackets the share of the activation transform + "
        "quantization): `cuda` = the CUDA list's kernel (`TritonIntDynamicKernel`: one Triton kernel for "
        "transform, clip and quantization, then torch._int_mm and the scales in torch), `torch` = all in "
        "torch eager (`TorchIntDynamicKernel`); last column: the same Triton activation kernel feeding "
        "vLLM's `triton_scaled_mm` (scales applied in its epilogue).",
        "",
        "| layer | M | bf16 us | W4A4 cuda | W4A4 torch | FlatQuant cuda | FlatQuant torch "
        "| FlatQuant: Triton act. + vLLM GEMM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in times:
        cells = [f"{r[f'{key}_speedup']:.2f}x ({r[f'{key}_quant_share']:.0%})" for key in SPEEDUPS[:4]] + [
            f"{r['flatquant_vllm_gemm_speedup']:.2f}x"
        ]
        lines.append(f"| {r['layer']} | {r['m']} | {r['bf16_us']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm-src", required=True, help="a vllm package dir, or a folder `collect` filled")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 2048, 8192])
    p.add_argument("out_dir", nargs="?", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    import triton

    vk = vllm_triton_source.load(args.vllm_src)
    version_file = Path(args.vllm_src) / "VERSION"
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "vllm_src": version_file.read_text().strip() if version_file.exists() else "installed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    exact = check_exactness(vk)
    print(json.dumps(exact, indent=1), flush=True)
    times = timings(vk, tuple(args.m))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_gemm.json").write_text(json.dumps({**info, "exactness": exact, "timings": times}, indent=1))
    text = report(info, exact, times)
    (out / "cuda_gemm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
