"""W4A16 prefill on CPU: today's kernel against "dequantize the 4-bit weight once per call, one bf16 GEMM".

A measurement for issue 17's 4-bit prefill item, not a kernel of the package yet. For each SmolLM2
shape and tokens per call it times vLLM's unquantized layer (bf16), ptq_ascend's W4A16 g64 layer as
served today (``choose_kernel``'s pick, printed), and a prototype: the checkpoint's packed nibbles,
kept as bytes (0.5 byte per weight), expanded through a 256-entry bf16 lookup table
(``index_select``), scaled per group in place in a reused buffer, then one bf16 GEMM. The prototype's
output is checked against a float64 reference of the same weights before it is timed.

    .venv/bin/python benchmarks/bench_w4_prefill_dequant.py
"""

from __future__ import annotations

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

GROUP = 64
TOKENS = (16, 64, 256, 1024, 4096)
# byte -> its two signed int4 values (compressed-tensors packs q + 8, element 2j in the low nibble)
_BYTES = torch.arange(256)
NIBBLES = torch.stack(((_BYTES & 0xF) - 8, (_BYTES >> 4) - 8), -1).to(torch.bfloat16)


class DequantGemm:
    """The prototype: int4 bytes -> bf16 weight in a reused buffer -> x @ w.T."""

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, n: int, k: int):
        self.n, self.k = n, k
        self.bytes = weight_packed.contiguous().view(torch.uint8).reshape(n, k // 2).to(torch.int32)
        self.scale = weight_scale.to(torch.bfloat16).reshape(n, k // GROUP, 1)
        self.buffer = torch.empty(n, k, dtype=torch.bfloat16)

    def weight(self) -> torch.Tensor:
        torch.index_select(NIBBLES, 0, self.bytes.view(-1), out=self.buffer.view(-1, 2))
        return self.buffer.view(self.n, self.k // GROUP, GROUP).mul_(self.scale).view(self.n, self.k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().t()


def ms_per_call(f, x, rounds: int = 5) -> float:
    f(x)
    t0 = time.perf_counter()
    for _ in range(rounds):
        f(x)
    return (time.perf_counter() - t0) / rounds * 1e3


def apply_of(layer):
    return lambda x: layer.quant_method.apply(layer, x)


def run() -> list[dict]:
    rows = []
    for label, (n, k) in linear.SHAPES["smollm2"].items():
        tensors = make_wna16_tensors(n, k, 4, GROUP, True)
        ours = linear.ours(ct_config(wna16(4, GROUP, True)), tensors, n, k, None)
        base = linear.unquantized(n, k)
        proto = DequantGemm(tensors["weight_packed"], tensors["weight_scale"], n, k)
        w64 = dequant_weight({f"layer.{name}": t for name, t in tensors.items()}, "layer", {"num_bits": 4})
        for m in TOKENS:
            x = torch.randn(m, k).to(torch.bfloat16)
            with torch.no_grad():
                ref = x.double() @ w64.t()
                err = float((proto(x).double() - ref).norm() / ref.norm())
                assert err < 2e-2, f"{label}: the prototype is wrong (relative error {err:.1e})"
                t = {"bf16": ms_per_call(apply_of(base), x), "ours": ms_per_call(apply_of(ours), x)}
                t["dequant"] = ms_per_call(proto, x)
            rows.append(
                {"shape": label, "tokens": m, "kernel": linear.kernel_name(ours), "rel_err": err}
                | {f"{k}_ms": v for k, v in t.items()}
            )
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | tokens | bf16 ms | ours ms (x bf16) | dequant + bf16 GEMM ms (x bf16) | dequant vs ours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b, o, d = r["bf16_ms"], r["ours_ms"], r["dequant_ms"]
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {b:.2f} | {o:.2f} ({b / o:.2f}x) | {d:.2f} ({b / d:.2f}x) "
            f"| {o / d:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    from common import machine, machine_line
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{conftest.free_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
        rows = run()
    info = machine()
    kernels = sorted({r["kernel"] for r in rows})
    md = (
        f"# W4A16 g{GROUP} prefill on CPU: today's kernel vs dequantize + bf16 GEMM ({info['date']})\n\n"
        f"{machine_line(info)}. Today's kernel: {', '.join(f'`{k}`' for k in kernels)}. Mean of 5 calls "
        "after one warm-up; the prototype's relative error against a float64 reference of the same weights "
        "is below 2e-2 (bf16 rounding of the weight and the product; `rel_err` in the JSON).\n\n"
        + table(rows)
        + "\n"
    )
    print(md)
    out = ROOT / "benchmarks" / "results" / "w4_prefill_dequant_cpu"
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
