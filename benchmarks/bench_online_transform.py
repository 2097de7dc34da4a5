"""The FlatQuant online transform on this CPU: factored (two batched matmuls), factored without an
identity right factor (o_proj per head), and one dense GEMM with the precomputed L ⊗ R.

At SmolLM2-135M's shapes (hidden 576 = 24 x 24, MLP 1536 = 32 x 48, o_proj per head 9 x 64) and the
token counts of decode and prefill. Each form is checked against the float64 dense product first.
Prints a table and saves benchmarks/results/online_transform_cpu.{md,json}. Timings are the median of
repeated calls in float32, the dtype the serving kernels transform in.

    .venv/bin/python benchmarks/bench_online_transform.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line  # noqa: E402

from vllm_ptq_ascend.formats.kronecker import kronecker_transform  # noqa: E402

SHAPES = {  # layer group: (n1, n2, right is the identity)
    "q/k/v, gate/up (576)": (24, 24, False),
    "down_proj (1536)": (32, 48, False),
    "o_proj per head (9 x 64)": (9, 64, True),
}
TOKENS = (1, 8, 64, 512, 2048)


def timed(fn, min_seconds: float = 0.2) -> float:
    """Median microseconds per call."""
    fn()
    runs = []
    deadline = time.perf_counter() + min_seconds
    while time.perf_counter() < deadline or len(runs) < 5:
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1e6


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, (n1, n2, identity_right) in SHAPES.items():
        left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].contiguous()
        right = torch.eye(n2) if identity_right else torch.linalg.qr(torch.randn(n2, n2, generator=g))[0]
        right = right.contiguous()
        dense = torch.kron(left, right).contiguous()
        for m in TOKENS:
            x = torch.randn(m, n1 * n2, generator=g)
            ref = x.double() @ torch.kron(left.double(), right.double())
            forms = {
                "factored": lambda x=x, left=left, right=right: kronecker_transform(x, left, right),
                "dense": lambda x=x, dense=dense: x @ dense,
            }
            if identity_right:  # what the torch kernels run for it (right_or_none)
                forms["left only"] = lambda x=x, left=left: kronecker_transform(x, left, None)
            row = {"group": label, "n1": n1, "n2": n2, "m": m}
            for name, fn in forms.items():
                err = float((fn().double() - ref).norm() / ref.norm())
                assert err < 1e-5, (label, m, name, err)
                row[f"{name}_us"] = timed(fn)
            rows.append(row)
            print(row, flush=True)
    info = machine()
    names = ["factored", "left only", "dense"]
    lines = [
        f"# FlatQuant online transform on this CPU ({info['date']})",
        "",
        machine_line(info) + f"; torch threads {torch.get_num_threads()}.",
        "Microseconds per call (median), float32; every form checked against the float64 dense product.",
        "",
        "| group | tokens | factored us | left only us | dense (L ⊗ R) us | dense / factored |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[f'{k}_us']:.1f}" if f"{k}_us" in r else "–" for k in names]
        lines.append(
            f"| {r['group']} | {r['m']} | "
            + " | ".join(cells)
            + f" | {r['dense_us'] / r['factored_us']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "online_transform_cpu.md").write_text(text)
    (RESULTS / "online_transform_cpu.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
