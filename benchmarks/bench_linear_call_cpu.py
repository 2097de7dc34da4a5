"""Per-call cost of one W8A8 linear layer: ptq_ascend's scheme vs stock vLLM's, same tensors, same CPU.

The end-to-end benchmark (bench_w8a8_cpu.py) varies by +-5% between runs on a 2-core
machine; this isolates the layer: both paths are built from identical checkpoint
tensors, checked to give bit-identical outputs, and timed alternately.

    .venv/bin/python benchmarks/bench_linear_call_cpu.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import conftest  # noqa: E402,F401  (vLLM-CPU environment defaults)
from layer_helpers import W8A8_DYNAMIC, build_layer, ct_config, load_tensors, make_w8a8_tensors  # noqa: E402

SHAPES = {"SmolLM2 gate_up (576 -> 3072)": (3072, 576), "SmolLM2 down (1536 -> 576)": (576, 1536)}


def stock_layer(tensors, k, n):
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(torch.bfloat16):
        layer = ReplicatedLinear(
            k, n, bias=False, quant_config=CompressedTensorsConfig.from_config(ct_config(*W8A8_DYNAMIC))
        )
        load_tensors(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)
    return layer


def per_call_us(layer, x, n):
    for _ in range(50):
        layer.quant_method.apply(layer, x)
    t0 = time.perf_counter()
    for _ in range(n):
        layer.quant_method.apply(layer, x)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    rows = []
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{conftest.free_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
        for name, (n, k) in SHAPES.items():
            tensors = make_w8a8_tensors(n, k)
            ours = build_layer("ReplicatedLinear", ct_config(*W8A8_DYNAMIC), k, n, torch.bfloat16, bias=False)
            load_tensors(ours, tensors)
            ours.quant_method.process_weights_after_loading(ours)
            stock = stock_layer(tensors, k, n)
            for m in (8, 256):
                x = torch.randn(m, k, dtype=torch.bfloat16)
                assert torch.equal(ours.quant_method.apply(ours, x), stock.quant_method.apply(stock, x))
                iters = 2000 if m == 8 else 200
                t_ours, t_stock = [], []
                for _ in range(5):  # alternate to share any drift
                    t_ours.append(per_call_us(ours, x, iters))
                    t_stock.append(per_call_us(stock, x, iters))
                rows.append(
                    {
                        "layer": name,
                        "m": m,
                        "ours_us": statistics.median(t_ours),
                        "stock_us": statistics.median(t_stock),
                    }
                )
    lines = [
        "| layer | tokens | ptq_ascend us/call | stock us/call | stock / ptq_ascend |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['m']} | {r['ours_us']:.1f} | {r['stock_us']:.1f} | "
            f"{r['stock_us'] / r['ours_us']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    from common import machine, machine_line

    info = machine()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_call_cpu.md").write_text(
        f"# W8A8 dynamic linear, one call, bf16 (outputs bit-identical), {info['date']}\n\n"
        + machine_line(info)
        + ".\n\n"
        + table
        + "\n"
    )
    (out / "linear_call_cpu.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
