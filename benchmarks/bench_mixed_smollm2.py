"""Mixed precision on SmolLM2-135M-Instruct: a uniform preset (W4A8 group 64, or W4A4 round-to-nearest)
against the same preset with the most sensitive units kept at W8A8 under a few perplexity budgets.

    python benchmarks/bench_mixed_smollm2.py [--preset w4a8|w4a4-rtn] [--budgets ppl=20,ppl=10] [--skip-bench]

Steps, each through the CLI and resumable (finished checkpoints and results are kept):
  1. `sensitivity` scan of the preset on 4 shipped calibration samples of up to 128 tokens (by default);
  2. `quantize --recipe PRESET --budget B --scan scan/sensitivity.json` per budget (W4A8: GPTQ, 64 samples);
  3. `eval` (perplexity and KL on the held-out GSM8K solutions, HellaSwag) and `bench` (offline, no
     server) of bf16, the uniform preset and the mixed checkpoints, then `report`;
  4. summary.md / summary.json here: budget, units kept, size, perplexity, KL, HellaSwag, tokens/s.
The budget is measured on the scan samples (what `quantize` controls); perplexity and KL in the
summary are measured on held-out text (what a user sees).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import machine, machine_line  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "mixed_smollm2"
CKPTS = REPO / ".cache" / "bench-mixed"
CLI = [sys.executable, "-m", "vllm_ptq_ascend.cli"]
# 4 samples x 128 tokens: each scanned unit is one forward pass of these, 120 units on SmolLM2
SCAN = ("--scan-samples", "4", "--scan-seq-len", "128")


def run(*args: str) -> None:
    print("+ vllm-ptq-ascend", " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True, cwd=REPO)


# preset -> (results folder, the preset's own options, the name its checkpoints get)
SETUPS = {
    "w4a8": ("mixed_smollm2", ("--group-size", "64"), "w4a8-g64"),
    "w4a4-rtn": ("mixed_w4a4_smollm2", (), "w4a4-rtn"),
}


def main() -> int:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(SETUPS), default="w4a8")
    p.add_argument("--budgets", default="ppl=20,ppl=10")
    p.add_argument("--scan-samples", default=SCAN[1])
    p.add_argument("--scan-seq-len", default=SCAN[3])
    p.add_argument("--skip-bench", action="store_true")
    a = p.parse_args()
    from vllm_ptq_ascend.assets.embedded import embedded_model_dir

    folder, options, tag0 = SETUPS[a.preset]
    OUT = REPO / "benchmarks" / "results" / folder
    scan_args = ("--scan-samples", str(a.scan_samples), "--scan-seq-len", str(a.scan_seq_len))
    base = embedded_model_dir()
    scan = OUT / "scan" / "sensitivity.json"
    if not scan.is_file():
        run("sensitivity", str(base), "--scheme", a.preset, *options, "--out", str(scan.parent), *scan_args)
    uniform = CKPTS / f"smollm2-{tag0}"
    if not (uniform / "config.json").is_file():
        run("quantize", str(base), "--recipe", a.preset, *options, "--out", str(uniform))
    models = [f"bf16={base}", f"{tag0}={uniform}"]
    for budget in a.budgets.split(","):
        tag = budget.replace("=", "").replace(".", "p")
        ckpt = CKPTS / f"smollm2-{tag0}-{tag}"
        if not (ckpt / "config.json").is_file():
            run("quantize", str(base), "--recipe", a.preset, *options, "--budget", budget,
                "--scan", str(scan), "--out", str(ckpt), *scan_args)  # fmt: skip
        models.append(f"{tag0}-{tag}={ckpt}")
    run("eval", *models, "--results", str(OUT), "--tasks", "hellaswag", "--no-report")
    if not a.skip_bench:
        run("bench", *models, "--results", str(OUT), "--no-serve", "--no-report")
    run("report", str(OUT))
    write_summary(models, tag0)
    return 0


def write_summary(models: list[str], tag0: str = "w4a8-g64") -> None:
    rows = []
    for spec in models:
        name, path = spec.split("=", 1)
        ev = json.loads((OUT / "eval" / f"{name}.json").read_text())
        bench_file = OUT / "bench" / f"{name}.json"
        be = json.loads(bench_file.read_text()) if bench_file.is_file() else None
        card_file = Path(path) / "ptq_ascend_card.json"
        mixed = json.loads(card_file.read_text()).get("mixed_precision") if card_file.is_file() else None
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20
        rows.append({
            "model": name,
            "budget": mixed["budget"] if mixed else None,
            "kept_units": len(mixed["kept_units"]) if mixed else None,
            "units_total": mixed["units_total"] if mixed else None,
            "scan_ppl_change_pct": mixed["checkpoint"]["ppl_change_pct"] if mixed else None,
            "size_mib": size,
            "perplexity": ev["perplexity"]["value"],
            "kl": (ev["kl"] or {}).get("mean"),
            "hellaswag": ev["modes"]["loglik"]["tasks"]["hellaswag"]["accuracy"],
            "decode_tok_s": be["offline"]["decode_tok_s"] if be else None,
            "prefill_tok_s": be["offline"]["prefill_tok_s"] if be else None,
        })  # fmt: skip
    base_ppl = rows[0]["perplexity"]
    info = machine()
    lines = [
        f"# Mixed precision on SmolLM2-135M-Instruct: {tag0} with sensitive units at W8A8",
        "",
        f"{machine_line(info)}; {info['date']}. Generated by `benchmarks/bench_mixed_smollm2.py`.",
        "Budget and 'scan-set ppl' are measured on the 4 scan samples (what `quantize --budget` controls); "
        "perplexity, KL and HellaSwag on held-out text and items (`vllm-ptq-ascend eval`).",
        "",
        "| model | budget | units kept at W8A8 | size MiB | scan-set ppl | held-out ppl | change | KL | "
        "HellaSwag | prefill tok/s | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    for r in rows:
        kept = f"{r['kept_units']}/{r['units_total']}" if r["kept_units"] is not None else "–"
        scan_ppl = f"{r['scan_ppl_change_pct']:+.1f}%" if r["scan_ppl_change_pct"] is not None else "–"
        lines.append(
            f"| {r['model']} | {r['budget'] or '–'} | {kept} | {r['size_mib']:.0f} | {scan_ppl} | "
            f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / base_ppl - 1):+.1f}% | {f(r['kl'], '.4f')} | "
            f"{r['hellaswag']:.2f} | {f(r['prefill_tok_s'], '.0f')} | {f(r['decode_tok_s'], '.1f')} |"
        )
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    (OUT / "summary.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
