"""Chain-of-thought modes: the modes file, model family detection, and mode mixing.

Model families and their modes (how slow_think / no_think / ... are requested) are data, read from
``recipes/cot_modes.yaml``. ``modes="slow_think:0.5,no_think:0.5"`` mixes modes; the number of samples
per mode is exact (largest remainder), and the modes are shuffled with the seed.
"""

from __future__ import annotations

import json
import math
import random
import re
from functools import lru_cache
from pathlib import Path

MODES_FILE = Path(__file__).parent.parent / "cot_modes.yaml"
MIX_TOLERANCE = 1e-3


@lru_cache(maxsize=None)
def _load_modes_file(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    families = data.get("families") if isinstance(data, dict) else None
    if not isinstance(families, list) or not families:
        raise ValueError(f"{path}: expected a top-level 'families' list")
    for fam in families:
        name = fam.get("name")
        modes = fam.get("modes")
        if not name or not isinstance(modes, dict) or not modes:
            raise ValueError(f"{path}: family {name!r} needs a name and a non-empty 'modes' mapping")
        if fam.get("default_mode") not in modes:
            raise ValueError(f"{path}: family {name!r}: default_mode must be one of {sorted(modes)}")
        if not isinstance(fam.get("match"), list):
            raise ValueError(f"{path}: family {name!r}: 'match' must be a list of rules")
    return data


def load_modes(path: str | Path | None = None) -> dict:
    """The parsed chain-of-thought modes file (``cot_modes.yaml`` by default)."""
    return _load_modes_file(str(path or MODES_FILE))


def _chat_template_text(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates
        return "\n".join(str(v) for v in tpl.values())
    return tpl or ""


def _read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _rule_matches(rule: dict, config: dict, template: str, names: list[str]) -> bool:
    for key, wanted in rule.items():
        wanted = [str(w) for w in _as_list(wanted)]
        if key == "model_type":
            have = str(config.get("model_type", "")).lower()
            ok = any(have == w.lower() for w in wanted)
        elif key == "architectures":
            ok = any(a in wanted for a in config.get("architectures") or [])
        elif key == "chat_template_contains":
            ok = any(w in template for w in wanted)
        elif key == "name_contains":
            ok = any(w.lower() in n.lower() for w in wanted for n in names)
        else:
            raise ValueError(f"{MODES_FILE}: unknown match condition {key!r}")
        if not ok:
            return False
    return True


def detect_family(model_dir: str | Path, tokenizer=None, modes_file: str | Path | None = None) -> dict:
    """The first family of the modes file whose match rules fit this model (config.json + chat template)."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    template = _chat_template_text(tokenizer) if tokenizer is not None else ""
    names = [model_dir.resolve().name, str(config.get("_name_or_path", ""))]
    for fam in load_modes(modes_file)["families"]:
        for rule in fam["match"]:
            if _rule_matches(rule or {}, config, template, names):
                return {**fam, "matched_by": rule or {}}
    raise ValueError(f"{modes_file or MODES_FILE}: no family matches {model_dir} (add a catch-all family)")


# ---------------------------------------------------------------- mode mixing

_MODE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def parse_mode_mix(text: str) -> dict[str, float]:
    """``"slow_think:0.5,no_think:0.5"`` -> ``{"slow_think": 0.5, "no_think": 0.5}``.

    A single bare mode name (``"no_think"``) means weight 1. Weights must be finite, >= 0, and sum to 1
    (within 1e-3, for rounded thirds).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"modes: empty mode mix {text!r}; expected e.g. 'slow_think:0.5,no_think:0.5'")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1 and ":" not in parts[0]:
        name = parts[0]
        if not _MODE_NAME.match(name):
            raise ValueError(f"modes: bad mode name {name!r} in {text!r}")
        return {name: 1.0}
    mix: dict[str, float] = {}
    for part in parts:
        if part.count(":") != 1:
            raise ValueError(
                f"modes: entry {part!r} of {text!r} is not 'mode:weight' (e.g. 'slow_think:0.5')"
            )
        name, weight_s = (s.strip() for s in part.split(":"))
        if not _MODE_NAME.match(name):
            raise ValueError(f"modes: bad mode name {name!r} in {text!r}")
        if name in mix:
            raise ValueError(f"modes: mode {name!r} appears twice in {text!r}")
        try:
            weight = float(weight_s)
        except ValueError:
            raise ValueError(f"modes: weight {weight_s!r} of mode {name!r} is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"modes: weight of mode {name!r} must be finite, got {weight_s!r}")
        if weight < 0:
            raise ValueError(f"modes: weight of mode {name!r} is negative ({weight})")
        mix[name] = weight
    total = sum(mix.values())
    if abs(total - 1.0) > MIX_TOLERANCE:
        raise ValueError(f"modes: weights of {text!r} sum to {total:g}, not 1")
    return mix


def mode_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Exact per-mode counts summing to ``n`` (largest remainder; ties go to the earlier mode)."""
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("modes: all weights are zero")
    quotas = {m: w * n / total for m, w in mix.items()}
    counts = {m: math.floor(q) for m, q in quotas.items()}
    order = sorted(mix, key=lambda m: (-(quotas[m] - counts[m]), list(mix).index(m)))
    for m in order[: n - sum(counts.values())]:
        counts[m] += 1
    return counts


def mode_assignment(mix: dict[str, float], n: int, seed: int) -> list[str]:
    """The mode of each of ``n`` sample slots: exact counts, shuffled with ``seed``."""
    slots = [m for m, c in mode_counts(mix, n).items() for _ in range(c)]
    random.Random(f"modes-{seed}").shuffle(slots)
    return slots


def resolve_modes(family: dict, modes: str | None) -> dict[str, float]:
    """The mode mix for ``family``; every mode must be one the family has."""
    mix = parse_mode_mix(modes) if modes is not None else {family["default_mode"]: 1.0}
    unknown = [m for m in mix if m not in family["modes"]]
    if unknown:
        raise ValueError(
            f"modes: {', '.join(repr(m) for m in unknown)} not available for model family "
            f"{family['name']!r}; its modes are: {', '.join(family['modes'])}"
        )
    return mix
