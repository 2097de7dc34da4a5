"""Running a sensitivity scan for a preset, and writing its ranked table, JSON and plot."""

from __future__ import annotations

import datetime
import io
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
from vllm_ptq_ascend.recipes.presets import build_recipe
from vllm_ptq_ascend.recipes.sensitivity import QuantArgs, quant_units, reference, scan

SCAN_CALIBRATION = CalibrationSpec(num_samples=8, max_seq_length=256)


def preset_quant_args(preset: str, **options) -> QuantArgs:
    """The fake quantization of a preset: its first config group's weight and activation args."""
    for m in build_recipe(preset, **options):
        groups = getattr(m, "config_groups", None)
        if groups:
            group = next(iter(groups.values()))
            data = group.model_dump(exclude_none=True) if hasattr(group, "model_dump") else dict(group)
            return QuantArgs.from_group(data)
    raise ValueError(f"preset {preset!r} has no quantization config group")


def scan_samples(model_dir, tokenizer, spec: CalibrationSpec) -> list[list[int]]:
    from vllm_ptq_ascend.env import repo_cache_root
    from vllm_ptq_ascend.recipes.calibration import build_samples

    samples, _ = build_samples(model_dir, tokenizer, spec, cache_dir=repo_cache_root() / "calibration")
    return [s.input_ids for s in samples]


@dataclass
class ScanSetup:
    model: object
    tokenizer: object
    samples: list[list[int]]
    args: QuantArgs
    ignore: tuple[str, ...]


def load_for_scan(
    model_dir, preset: str, options: dict, spec: CalibrationSpec | None, dtype: str
) -> ScanSetup:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = preset_quant_args(preset, **options)
    ignore = tuple(options.get("ignore") or ("lm_head",))
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = scan_samples(model_dir, tok, spec or SCAN_CALIBRATION)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return ScanSetup(model, tok, samples, args, ignore)


def run_scan(model_dir, preset: str, options: dict | None = None, *, spec: CalibrationSpec | None = None,
             granularity: str = "unit", dtype: str = "float32", progress: bool = True) -> dict:  # fmt: skip
    """Scan ``model_dir`` with ``preset``'s grid; the ranked rows plus what was measured and how."""
    options = dict(options or {})
    s = load_for_scan(model_dir, preset, options, spec, dtype)
    units = quant_units(s.model, s.ignore, granularity)
    ref = reference(s.model, s.samples)
    rows = scan(s.model, ref, units, s.args, progress)
    from vllm_ptq_ascend.recipes.sensitivity import fake_quantized, layer_args, measure

    with fake_quantized(s.model, layer_args(units, set(), s.args, None)):
        uniform = measure(s.model, ref)
    return {
        "schema": "vllm-ptq-ascend.sensitivity/1",
        "model": str(Path(model_dir).resolve()),
        "preset": preset,
        "options": options,
        "granularity": granularity,
        "samples": len(s.samples),
        "tokens": sum(len(x) - 1 for x in s.samples),
        "baseline_perplexity": ref.perplexity,
        "uniform": asdict(uniform),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def render_markdown(result: dict, top: int = 30) -> str:
    u, g = result["uniform"], result["granularity"]
    lines = [
        f"# Sensitivity scan: {result['preset']} on {Path(result['model']).name}",
        "",
        f"{result['samples']} calibration samples ({result['tokens']} scored tokens), {g}s quantized one "
        f"at a time (round to nearest on the preset's grid); baseline perplexity "
        f"{result['baseline_perplexity']:.3f}. "
        f"Every {g} quantized at once: KL {u['kl']:.4f}, perplexity {u['ppl_change_pct']:+.2f}%.",
        "",
        "| rank | unit | block | KL (nats) | perplexity change | block output rel. MSE |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"][:top]:
        mse = f"{r['mse']:.2e}" if r.get("mse") is not None else "–"
        change = f"{r['ppl_change_pct']:+.3f}%"
        lines.append(f"| {r['rank']} | {r['unit']} | {r['block']} | {r['kl']:.5f} | {change} | {mse} |")
    if len(result["rows"]) > top:
        lines.append(f"\n({len(result['rows']) - top} more in sensitivity.json)")
    lines += ["", "![KL per unit](sensitivity.png)", ""]
    return "\n".join(lines)


def render_plot(result: dict) -> bytes:
    from vllm_ptq_ascend.eval.report import require_matplotlib

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = {"qkv_proj": 0, "o_proj": 1, "gate_up_proj": 2, "down_proj": 3}  # forward order in a block
    rows = sorted(result["rows"], key=lambda r: (r["block"], order.get(r["unit"].rsplit(".", 1)[-1], 9)))
    fig = Figure(figsize=(max(6, 0.12 * len(rows)), 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    kinds = sorted({r["unit"].rsplit(".", 1)[-1] for r in rows})
    for kind in kinds:
        pts = [(i, r["kl"]) for i, r in enumerate(rows) if r["unit"].rsplit(".", 1)[-1] == kind]
        ax.bar([p[0] for p in pts], [p[1] for p in pts], label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("unit (in forward order)")
    ax.set_ylabel("KL vs baseline (nats)")
    ax.set_title(f"{result['preset']}: damage of quantizing one {result['granularity']} at a time")
    ax.legend(fontsize=7, ncol=min(4, len(kinds)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_scan(result: dict, out_dir) -> Path:
    """sensitivity.json, sensitivity.md and sensitivity.png in ``out_dir`` (each written atomically)."""
    from vllm_ptq_ascend.eval.results import write_bytes_atomic, write_json_atomic

    out = Path(out_dir)
    write_json_atomic(out / "sensitivity.json", result)
    write_bytes_atomic(out / "sensitivity.png", render_plot(result))
    write_bytes_atomic(out / "sensitivity.md", render_markdown(result).encode("utf-8"))
    return out / "sensitivity.md"
