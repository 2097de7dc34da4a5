"""What a model directory is, for the tables: a short name, the scheme, weight and activation bits."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from vllm_ptq_ascend.eval.results import check_model_name

CARD = "ptq_ascend_card.json"
MSMODELSLIM_DESCRIPTION = "quant_model_description.json"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    scheme: str  # preset name, msModelSlim label, or the dtype of an unquantized model
    weight_bits: int
    activation_bits: int
    quantized: bool


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _ct_bits(qcfg: dict, config_path: Path) -> tuple[int, int]:
    """The widest weight and activation bits over a compressed-tensors config's groups."""
    groups = qcfg.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{config_path}: quantization_config has no config_groups")
    w_bits, a_bits = 0, 0
    for g in groups.values():
        weights = (g or {}).get("weights") or {}
        acts = (g or {}).get("input_activations") or {}
        w_bits = max(w_bits, int(weights.get("num_bits", 16)))
        a_bits = max(a_bits, int(acts.get("num_bits", 16)) if acts else 16)
    return w_bits, a_bits


def _msmodelslim_bits(desc: dict) -> tuple[str, int, int]:
    labels = {v for k, v in desc.items() if isinstance(v, str) and k.endswith(".weight")}
    labels.discard("FLOAT")
    if not labels:
        return "FLOAT", 16, 16
    bits = [re.match(r"W(\d+)A(\d+)", label) for label in labels]
    w = max(int(m.group(1)) for m in bits if m)
    a = max(int(m.group(2)) for m in bits if m)
    return "+".join(sorted(labels)), w, a


def describe_model(path: str | Path, name: str | None = None, dtype: str = "bfloat16") -> ModelInfo:
    """Scheme and bits of a model directory (our card, compressed-tensors or msModelSlim config)."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path}: not a model directory (no config.json)")
    config = _read_json(config_path)
    qcfg = config.get("quantization_config")
    card = path / CARD
    if (path / MSMODELSLIM_DESCRIPTION).is_file():
        scheme, w, a = _msmodelslim_bits(_read_json(path / MSMODELSLIM_DESCRIPTION))
        quantized = scheme != "FLOAT"
    elif qcfg:
        w, a = _ct_bits(qcfg, config_path)
        scheme = (
            _read_json(card).get("recipe", "compressed-tensors")
            if card.is_file()
            else qcfg.get("format", "compressed-tensors")
        )
        quantized = True
    else:
        scheme, w, a, quantized = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype), 16, 16, False
    if name is None:
        name = scheme if card.is_file() or not quantized else path.name
        if card.is_file():
            group = (_read_json(card).get("recipe_options") or {}).get("group_size")
            name = f"{scheme}-g{group}" if group else scheme
    return ModelInfo(check_model_name(name), str(path.resolve()), scheme, w, a, quantized)


def fitting_max_model_len(path: str | Path, wanted: int) -> int:
    """``wanted``, capped at the model's own context length (vLLM refuses a longer one)."""
    config = _read_json(Path(path) / "config.json")
    limit = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    return min(wanted, int(limit)) if limit else wanted


def describe_models(models: list[tuple[str, str | None]], dtype: str = "bfloat16") -> list[ModelInfo]:
    """``describe_model`` of each (path, name or None); two models may not share a name."""
    infos = [describe_model(p, n, dtype) for p, n in models]
    names = [i.name for i in infos]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two models share the name(s) {dupes}; name them with NAME=DIR")
    return infos
