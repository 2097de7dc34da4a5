"""Weight-only layers on CPU whose long calls dequantize once and run one GEMM (``kernels/cpu_dequant.py``).

Issue 17's 4-bit prefill and int8-resident W8A16. For each shape and tokens per call it times vLLM's
unquantized layer (bf16), stock vLLM's layer on the same tensors (``CompressedTensorsConfig``) where
it has one, and ptq_ascend's layer as chosen and with its per-call switch forced each way:

- ``--bits 4`` (W4A16 g64): ``CpuWna16PrefillKernel`` (under ``CpuInt4GemvKernel`` for a few tokens);
  its cpu_gemm_wna16 path alone, its dequantize path alone.
- ``--bits 8`` (per-channel W8A16): ``CpuInt8WeightKernel``; its ``_weight_int8pack_mm`` path alone, its
  dequantize path alone; and the weight dequantized once at load (a bf16 copy), multiplied by vLLM-CPU's
  unquantized GEMM (``CpuDequantizedKernel``, what grouped W8A16 runs on) and by F.linear (the portable
  ``TorchWeightOnlyKernel``, what served every W8A16 layer before).

The forced paths say where the crossover is, and so what the switch should be. Every output is
checked against a float64 reference of the same weights first.

    .venv/bin/python benchmarks/bench_dequant_cpu.py --bits 4 [--shapes smollm2 7b]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_linear_kernels as linear  # noqa: E402

from tests import conftest  # noqa: E402
from tests.layer_helpers import ct_config, make_wna16_tensors, wna16  # noqa: E402
from tests.reference import dequant_weight  # noqa: E402
from vllm_ptq_ascend.kernels import cpu_dequant  # noqa: E402

TOKENS = {
    "smollm2": (1, 8, 16, 64, 128, 256, 384, 512, 768, 1024, 2048, 4096),
    "7b": (1, 8, 64, 256, 512, 1024, 2048),
}
GROUP = {4: 64, 8: None}  # W4A16 g64; W8A16 per channel (torch's int8 kernel takes no groups)
#: per bits: the kernel's switch (attribute) and the values forcing each path
SWITCH = {
    4: ("min_tokens", {"wna16 path": 10**9, "dequant path": 0}),
    8: ("gemv_max_tokens", {"int8pack path": 10**9, "dequant path": 0}),
}


def ms_per_call(f, x, rounds: int = 5) -> float:
    f(x)
    t0 = time.perf_counter()
    for _ in range(rounds):
        f(x)
    return (time.perf_counter() - t0) / rounds * 1e3


def apply_of(layer):
    return lambda x: layer.quant_method.apply(layer, x)


def dequant_kernel(layer):
    kernel = layer.scheme.kernel
    return getattr(kernel, "large", kernel)


def forced(layer, attribute: str, value: int):
    kernel = dequant_kernel(layer)

    def call(x):
        saved = getattr(kernel, attribute)
        setattr(kernel, attribute, value)
        try:
            return layer.quant_method.apply(layer, x)
        finally:
            setattr(kernel, attribute, saved)

    return call


def layers(bits: int, n: int, k: int) -> tuple[dict, torch.Tensor]:
    tensors = make_wna16_tensors(n, k, bits, GROUP[bits], True)
    cfg = ct_config(wna16(bits, GROUP[bits], True))
    ours = linear.ours(cfg, tensors, n, k, None)
    calls = {"bf16": apply_of(linear.unquantized(n, k)), "ours": apply_of(ours)}
    try:
        calls["stock"] = apply_of(stock := linear.stock(cfg, tensors, n, k))
        calls["stock"].kernel = linear.stock_kernel(stock)
    except Exception as e:  # stock vLLM-CPU has no kernel for it: say so in the table
        print(f"stock vLLM: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    if bits == 8:  # what grouped W8A16 gets (dequantized at load), and what it got before (F.linear)
        calls["at load, vLLM's GEMM"] = apply_of(linear.ours(cfg, tensors, n, k, "CpuInt8WeightKernel"))
        before = "CpuInt8WeightKernel,CpuDequantizedKernel"
        calls["at load, F.linear"] = apply_of(linear.ours(cfg, tensors, n, k, before))
    attribute, paths = SWITCH[bits]
    calls |= {path: forced(ours, attribute, v) for path, v in paths.items()}
    calls["ours"].kernel = linear.kernel_name(ours)
    w64 = dequant_weight({f"layer.{name}": t for name, t in tensors.items()}, "layer", {"num_bits": bits})
    return calls, w64


def run(bits: int, shape_sets: list[str]) -> list[dict]:
    rows = []
    for shapes in shape_sets:
        for label, (n, k) in linear.SHAPES[shapes].items():
            calls, w64 = layers(bits, n, k)
            for m in TOKENS[shapes]:
                x = torch.randn(m, k).to(torch.bfloat16)
                with torch.no_grad():
                    ref = x.double() @ w64.t()
                    for name, f in calls.items():
                        if name != "bf16":
                            err = float((f(x).double() - ref).norm() / ref.norm())
                            assert err < 2e-2, f"{label}, {m} tokens, {name}: relative error {err:.1e}"
                    t = {name: ms_per_call(f, x) for name, f in calls.items()}
                kernels = {f"{name}_kernel": f.kernel for name, f in calls.items() if hasattr(f, "kernel")}
                rows.append({"shape": label, "tokens": m, **kernels, "ms": t})
                print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    columns = [c for c in rows[0]["ms"] if c != "bf16"]
    lines = [
        "| shape | tokens | bf16 ms | " + " | ".join(f"{c} ms (x bf16)" for c in columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for r in rows:
        b = r["ms"]["bf16"]
        cells = [f"{r['ms'][c]:.2f} ({b / r['ms'][c]:.2f}x)" for c in columns]
        lines.append(f"| {r['shape']} | {r['tokens']} | {b:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def switch_text(bits: int) -> str:
    tiles = (
        f"weights of more than {cpu_dequant.SMALL_WEIGHT} elements in tiles of {cpu_dequant.TILE_ROWS} rows"
    )
    if bits == 4:
        return f"{cpu_dequant.DEQUANT_MIN_TOKENS} tokens ({tiles})"
    return f"more than {cpu_dequant.INT8_GEMV_MAX_TOKENS} tokens ({tiles})"


def main() -> None:
    from common import machine, machine_line
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=sorted(SWITCH), default=4)
    parser.add_argument("--shapes", nargs="+", choices=sorted(TOKENS), default=["smollm2"])
    parser.add_argument("--name", help="results file stem (default: w4_prefill_dequant_cpu / w8a16_int8_cpu)")
    args = parser.parse_args()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{conftest.free_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
        rows = run(args.bits, args.shapes)
    info = machine()
    kernels = {k: sorted({r[k] for r in rows if k in r}) for k in ("ours_kernel", "stock_kernel")}
    what = "W4A16 g64" if args.bits == 4 else "W8A16 per channel"
    stock = ", ".join(f"`{k}`" for k in kernels["stock_kernel"]) or "none (it has no kernel for it here)"
    md = (
        f"# {what} on CPU: dequantize once per long call, one GEMM ({info['date']})\n\n"
        f"{machine_line(info)}. Ours: {', '.join(f'`{k}`' for k in kernels['ours_kernel'])}; stock vLLM: "
        f"{stock}. Ours switches at {switch_text(args.bits)}. The path columns are ours with that switch "
        "forced one way "
        f"(`{SWITCH[args.bits][0]}`). Mean of 5 calls after one warm-up; every output was first checked "
        "against a float64 reference of the same weights (relative error below 2e-2).\n\n"
        + table(rows)
        + "\n"
    )
    print(md)
    name = args.name or ("w4_prefill_dequant_cpu" if args.bits == 4 else "w8a16_int8_cpu")
    out = ROOT / "benchmarks" / "results" / name
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(
        json.dumps({"machine": info, "bits": args.bits, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
