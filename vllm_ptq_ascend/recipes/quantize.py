"""Run an llmcompressor recipe on a model directory and write a checkpoint atomically.

The checkpoint is written into a hidden temporary directory beside ``out_dir``
and renamed into place only when complete, so a failed or interrupted run never
leaves a half-written checkpoint. Its ``quantization_config`` keeps
``quant_method: compressed-tensors`` (stock vLLM still loads it) and gains a
``ptq_ascend`` block, which makes vLLM pick our plugin with no flag.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import version
from pathlib import Path

from vllm_ptq_ascend import QUANT_METHOD, __version__
from vllm_ptq_ascend.atomic import atomic_directory
from vllm_ptq_ascend.recipes.presets import build_recipe


def mark_checkpoint(ckpt_dir: Path, info: dict) -> None:
    """Add our marker block to config.json's quantization_config."""
    cfg_path = ckpt_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise ValueError(f"{cfg_path}: no quantization_config was written; nothing to mark")
    qcfg[QUANT_METHOD] = {"version": __version__, **info}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    recipe: str = "w8a8-dynamic",
    *,
    overwrite: bool = False,
    **recipe_options,
) -> Path:
    """Quantize ``model_dir`` with a named preset into ``out_dir``; returns ``out_dir``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    modifiers = build_recipe(recipe, **recipe_options)

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    with atomic_directory(out_dir) as tmp:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        oneshot(model=model, recipe=modifiers)
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "recipe": recipe,
            "recipe_options": recipe_options,
            "source_model": str(model_dir),
            "calibration": None,
            "seconds": round(time.time() - start, 1),
            "libraries": {
                p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")
            },
        }
        mark_checkpoint(tmp, info)
        (tmp / "ptq_ascend_card.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
