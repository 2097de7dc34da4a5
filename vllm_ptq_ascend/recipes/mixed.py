"""Mixed precision under a measured budget: keep the most sensitive units at a safer scheme.

``quantize(..., budget="kl=0.05")`` (CLI ``--budget``) scans the preset's units on calibration
samples (``sensitivity.scan``), then keeps the k most damaging units at the fallback scheme
(``w8a8``: int8 per-channel weights and int8 per-token activations; ``w8a16``: int8 weights only;
``none``: unquantized), choosing the smallest k whose fake-quantized model meets the budget:
  kl=X   mean KL(baseline || quantized) over the samples' positions, in nats;
  ppl=X  perplexity increase on the samples, in percent.
k is found by doubling then bisecting over the ranking (each step one pass over the samples).
The checkpoint has one extra config group, whose targets name the kept layers exactly (exact names
take precedence over the preset's "Linear" target in compressed-tensors and in vLLM), or with
``none`` the kept layers join ``ignore``. After writing, the checkpoint itself is loaded back
(fake-quantized by compressed-tensors) and measured on the same samples: the model card reports
both, and whether the budget is met.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vllm_ptq_ascend.recipes.sensitivity import Damage, QuantArgs, fake_quantized, layer_args, measure

FALLBACKS = {
    "w8a8": {
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        },
        "format": "int-quantized",
    },
    "w8a16": {
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "format": "pack-quantized",
    },
    "none": None,
}
FALLBACK_GROUP = "fallback"
# recipe modifiers whose transforms the sensitivity scan does not apply (it quantizes the plain model)
TRANSFORM_MODIFIERS = {
    "QuIPModifier": "rotations",
    "SpinQuantModifier": "rotations",
    "FamilySpinQuantModifier": "rotations",
    "FlatQuantModifier": "learned FlatQuant transforms",
}


class BudgetError(ValueError):
    """The budget cannot be met, even with every unit at the fallback scheme."""


@dataclass(frozen=True)
class Budget:
    metric: str  # "kl" (nats) or "ppl" (percent increase)
    value: float

    @staticmethod
    def parse(text: str) -> "Budget":
        m = re.fullmatch(r"\s*(kl|ppl)\s*=\s*([0-9.eE+-]+)\s*(%?)\s*", str(text), flags=re.I)
        value = float(m.group(2)) if m and _is_number(m.group(2)) else None
        if m is None or value is None or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"budget {text!r}: expected kl=X (mean KL, nats) or ppl=X (perplexity increase, %), X >= 0"
            )
        if m.group(3) and m.group(1).lower() != "ppl":
            raise ValueError(f"budget {text!r}: only ppl takes a percent sign")
        return Budget(m.group(1).lower(), value)

    def met(self, d: Damage) -> bool:
        return self.met_values(vars(d))

    def met_values(self, d: dict) -> bool:
        return (d["kl"] if self.metric == "kl" else d["ppl_change_pct"]) <= self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}" + ("%" if self.metric == "ppl" else "")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def default_fallback(args: QuantArgs) -> str:
    """W8A8 where the preset quantizes activations, W8A16 where it does not."""
    return "w8a8" if args.activations is not None else "w8a16"


def fallback_args(fallback: str) -> QuantArgs | None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    return QuantArgs.from_group(FALLBACKS[fallback]) if FALLBACKS[fallback] else None


def select(model, ref, units, ranking: list[dict], args: QuantArgs, fallback: str, budget: Budget,
           progress: bool = True) -> dict:  # fmt: skip
    """The fewest top-ranked units to keep at ``fallback`` for the fake-quantized model to meet ``budget``."""
    fb = fallback_args(fallback)
    order = [r["unit"] for r in ranking]
    evaluations: dict[int, Damage] = {}

    def at(k: int) -> Damage:
        if k not in evaluations:
            with fake_quantized(model, layer_args(units, set(order[:k]), args, fb)):
                evaluations[k] = measure(model, ref)
        return evaluations[k]

    n = len(order)
    if not budget.met(at(0)):
        hi = 1
        while hi < n and not budget.met(at(hi)):
            hi *= 2
        hi = min(hi, n)
        if not budget.met(at(hi)):
            d = at(n)
            raise BudgetError(
                f"budget {budget} cannot be met: with all {n} units at {fallback} the model measures "
                f"kl={d.kl:.4g}, ppl {d.ppl_change_pct:+.2f}%; loosen the budget or use a safer --fallback"
            )
        lo = hi // 2  # fails (or 0, which failed)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if budget.met(at(mid)):
                hi = mid
            else:
                lo = mid
        k = hi
    else:
        k = 0
    kept_units = order[:k]
    return {
        "budget": str(budget),
        "fallback": fallback,
        "units_total": n,
        "kept_units": kept_units,
        "kept_layers": [name for u in units if u.name in set(kept_units) for name in u.layers],
        "share_kept": k / n if n else 0.0,
        "uniform": vars(at(0)),
        "selected": vars(at(k)),
        "evaluations": [{"kept": kk, **vars(d)} for kk, d in sorted(evaluations.items())],
    }


def apply_fallback(modifiers: list, kept_layers: list[str], fallback: str) -> None:
    """Give the kept layers the fallback scheme in every quantizing modifier of the recipe."""
    if not kept_layers:
        return
    from compressed_tensors.quantization import QuantizationScheme

    quantizers = [m for m in modifiers if getattr(m, "config_groups", None)]
    if not quantizers:
        raise ValueError("mixed precision: the recipe has no modifier with config_groups")
    for m in modifiers:  # FlatQuant learns the kept layers' transforms on the grid they are served at
        if type(m).__name__ == "FlatQuantModifier":
            m.w8a8_layers = list(kept_layers)
    for m in quantizers:
        if fallback == "none":
            m.ignore = list(m.ignore or []) + [n for n in kept_layers if n not in (m.ignore or [])]
        else:
            m.config_groups[FALLBACK_GROUP] = QuantizationScheme(
                targets=list(kept_layers), **FALLBACKS[fallback]
            )
        # llmcompressor's QuantizationMixin resolves (and caches) its config when the modifier is
        # built; without this the QuantizationModifier presets silently drop the change.
        if hasattr(m, "_resolved_config"):
            m._resolved_config = None


def load_ranking(path, model_dir, preset: str, options: dict, units) -> list[dict]:
    """The rows of a `vllm-ptq-ascend sensitivity` result, if it was made for this model and preset."""
    from pathlib import Path

    from vllm_ptq_ascend.eval.results import read_json
    from vllm_ptq_ascend.recipes.scan_run import preset_quant_args

    data = read_json(path, "vllm-ptq-ascend.sensitivity/1")
    want = {"model": str(Path(model_dir).resolve()), "preset": preset, "granularity": "unit"}
    have = {k: data.get(k) for k in want}
    grid = {k: v for k, v in options.items() if k != "ignore"}
    scanned = preset_quant_args(preset, **data.get("options", {}))
    same_grid = scanned.grid() == preset_quant_args(preset, **grid).grid()
    if have != want or not same_grid:
        raise ValueError(
            f"{path}: scanned {have} with options {data.get('options')}, not {want} with options {options}"
        )
    if sorted(r["unit"] for r in data["rows"]) != sorted(u.name for u in units):
        raise ValueError(f"{path}: its units are not this model's")
    return data["rows"]


def plan_mixed_precision(model_dir, preset: str, options: dict, modifiers: list, budget: Budget,
                         fallback: str | None, spec, progress: bool = True, scan_file=None):  # fmt: skip
    """Scan (or read ``scan_file``), select the units to keep, and change ``modifiers`` to keep them.

    Returns (plan, the scan samples' reference outputs).
    """
    import gc

    from vllm_ptq_ascend.recipes.scan_run import load_for_scan
    from vllm_ptq_ascend.recipes.sensitivity import quant_units, reference, scan

    groups = max(len(getattr(m, "config_groups", None) or {}) for m in modifiers)
    if groups > 1:
        raise ValueError(
            f"--budget is not supported with {preset!r}: it already mixes precisions ({groups} config "
            "groups), and the scan measures one grid; use a uniform preset with --budget"
        )
    s = load_for_scan(model_dir, preset, options, spec, "float32")
    units = quant_units(s.model, s.ignore)
    ref = reference(s.model, s.samples, keep_blocks=scan_file is None)
    if scan_file is not None:
        ranking = load_ranking(scan_file, model_dir, preset, options, units)
    else:
        ranking = scan(s.model, ref, units, s.args, progress)
    fallback = fallback or default_fallback(s.args)
    plan = select(s.model, ref, units, ranking, s.args, fallback, budget, progress)
    plan["samples"], plan["tokens"] = len(s.samples), sum(len(x) - 1 for x in s.samples)
    plan["scan_file"] = str(scan_file) if scan_file is not None else None
    plan["ranking"] = [{k: r[k] for k in ("rank", "unit", "kl", "ppl_change_pct", "mse")} for r in ranking]
    transforms = [type(m).__name__ for m in modifiers if type(m).__name__ in TRANSFORM_MODIFIERS]
    if transforms:  # the ranking is an approximation; the written checkpoint is measured with them
        what = TRANSFORM_MODIFIERS[transforms[0]]
        plan["scan_note"] = (
            f"the scan ranked layers by round-to-nearest quantization without the preset's {what} "
            f"({', '.join(transforms)}); the checkpoint's numbers are measured with them"
        )
    apply_fallback(modifiers, plan["kept_layers"], fallback)
    ref.block_outputs = []  # only the logits are needed from here on
    del s
    gc.collect()
    return plan, ref


def measure_checkpoint(ckpt_dir, ref) -> dict:
    """The written checkpoint, loaded back fake-quantized by compressed-tensors with its online
    transforms attached (as the self-check loads it), against ``ref``."""
    import gc

    from vllm_ptq_ascend.recipes.self_check import load_written

    model = load_written(ckpt_dir, "float32")
    try:
        return vars(measure(model, ref))
    finally:
        del model
        gc.collect()
