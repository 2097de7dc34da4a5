"""FlatQuant on SmolLM2-135M-Instruct: perplexity of bf16, RTN W4A4 and FlatQuant W4A4/W4A8/W8A8,
calibration wall time and peak RSS, serving speed with and without the online transform.

    python benchmarks/bench_flatquant_smollm2.py [--calib-samples 16 --calib-seq-len 256 --epochs 10]

Steps, each through the CLI and resumable (finished checkpoints and results are kept):
  1. `quantize` each preset in its own process, timed, with its peak RSS (getrusage of the child);
  2. `eval` (perplexity and KL on the held-out GSM8K solutions, HellaSwag) and `bench` (offline,
     no server; torch.profiler splits linear time into activation quantization and, within it,
     the online Kronecker transform) of every model, then `report`;
  3. summary.md / summary.json here. "Without the online transform" is RTN W4A4: the same
     kernels and bit widths, no transform.
Goals from the issue: FlatQuant W4A4 perplexity +<=10% where RTN W4A4 is above +50%; calibration
<= 15 min on this 2-core CPU; online transform <= 7% of linear time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import machine, machine_line  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "flatquant_smollm2"
CKPTS = REPO / ".cache" / "bench-flatquant"
CLI = [sys.executable, "-m", "vllm_ptq_ascend.cli"]
PRESETS = ("w4a4-rtn", "w4a4-flatquant", "w4a8-flatquant", "w8a8-flatquant")
# runs one command and prints its peak RSS (KiB): getrusage of the only child it waited for
RSS_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def quantize(base: Path, preset: str, calib: list[str]) -> dict:
    ckpt = CKPTS / f"smollm2-{preset}"
    record = OUT / "quantize" / f"{preset}.json"
    if (ckpt / "config.json").is_file() and record.is_file():
        return json.loads(record.read_text())
    args = ["quantize", str(base), "--recipe", preset, "--out", str(ckpt), "--overwrite"]
    if preset != "w4a4-rtn":
        args += calib
    print("+ vllm-ptq-ascend", " ".join(args), flush=True)
    start = time.time()
    command = [sys.executable, "-c", RSS_WRAPPER, *CLI, *args]
    # stdout is parsed; progress (stderr) passes through
    proc = subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    seconds = time.time() - start
    rss = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")))
    card = json.loads((ckpt / "ptq_ascend_card.json").read_text())
    out = {
        "preset": preset,
        "checkpoint": str(ckpt),
        "wall_s": round(seconds, 1),
        "peak_rss_mib": round(rss / 1024, 1),
        "calibration": card.get("calibration"),
        "recipe_options": card.get("recipe_options"),
        "flatquant": card.get("flatquant"),
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(out, indent=2) + "\n")
    return out


def run(*args: str) -> None:
    print("+ vllm-ptq-ascend", " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True, cwd=REPO)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--skip-bench", action="store_true")
    a = p.parse_args()
    from vllm_ptq_ascend.assets.embedded import embedded_model_dir

    base = embedded_model_dir()
    calib = ["--calib-samples", str(a.calib_samples), "--calib-seq-len", str(a.calib_seq_len)]
    calib += ["--epochs", str(a.epochs)]
    runs = [quantize(base, preset, calib) for preset in PRESETS]
    models = [f"bf16={base}"] + [f"{r['preset']}={r['checkpoint']}" for r in runs]
    run("eval", *models, "--results", str(OUT), "--tasks", "hellaswag", "--no-report")
    if not a.skip_bench:
        run("bench", *models, "--results", str(OUT), "--no-serve", "--no-report")
    run("report", str(OUT))
    write_summary(runs)
    return 0


def write_summary(runs: list[dict]) -> None:
    def load(kind: str, name: str) -> dict | None:
        path = OUT / kind / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    rows = []
    for name, q in [("bf16", None)] + [(r["preset"], r) for r in runs]:
        ev, be = load("eval", name), load("bench", name)
        rows.append({
            "model": name,
            "perplexity": ev["perplexity"]["value"],
            "kl": (ev["kl"] or {}).get("mean"),
            "hellaswag": ev["modes"]["loglik"]["tasks"]["hellaswag"]["accuracy"],
            "prefill_tok_s": be["offline"]["prefill_tok_s"] if be else None,
            "decode_tok_s": be["offline"]["decode_tok_s"] if be else None,
            "act_quant_share": ((be or {}).get("linear") or {}).get("act_quant_share"),
            "transform_share": ((be or {}).get("linear") or {}).get("transform_share"),
            "quantize": q,
        })  # fmt: skip
    base = rows[0]
    info = machine()

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = [
        "# FlatQuant on SmolLM2-135M-Instruct",
        "",
        f"{machine_line(info)}; {info['date']}. Generated by `benchmarks/bench_flatquant_smollm2.py`.",
        "Perplexity and KL on the held-out GSM8K solutions, HellaSwag (100 items) by log-likelihood "
        "(`vllm-ptq-ascend eval`); speed: offline batch of `vllm-ptq-ascend bench`, bf16 activations, "
        "vLLM-CPU. RTN W4A4 is the same kernels and bit widths without the online transform.",
        "",
        "| model | perplexity | change | KL | HellaSwag | quantize s | peak RSS MiB "
        "| block MSE identity → learned | prefill tok/s | decode tok/s | act-quant share | transform share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q = r["quantize"] or {}
        flat = q.get("flatquant")
        mse = f"{flat['initial_mse_mean']:.3g} → {flat['best_mse_mean']:.3g}" if flat else "–"
        change = "–" if r is base else f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%"
        cells = [
            r["model"], f"{r['perplexity']:.3f}", change, f(r["kl"], ".4f"), f"{r['hellaswag']:.2f}",
            f(q.get("wall_s"), ".0f"), f(q.get("peak_rss_mib"), ",.0f"), mse, f(r["prefill_tok_s"], ".0f"),
            f(r["decode_tok_s"], ".1f"), f(r["act_quant_share"], ".1%"), f(r["transform_share"], ".1%"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for run in runs:
        if run.get("flatquant"):
            calib = run["calibration"] or {}
            lines.append(
                f"\n{run['preset']}: {calib.get('num_samples')} calibration samples "
                f"({calib.get('num_tokens')} tokens), options {json.dumps(run['recipe_options'])}; "
                f"block training {run['flatquant']['seconds']:.0f} s of the {run['wall_s']:.0f} s quantize."
            )
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    (OUT / "summary.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
