"""Run a preset on a model directory and write a checkpoint atomically.

The checkpoint is written into a hidden temporary directory beside ``out_dir``
and renamed into place only when complete, so a failed or interrupted run never
leaves a half-written checkpoint. Its ``quantization_config`` keeps
``quant_method: compressed-tensors`` (stock vLLM still loads the schemes it has)
and gains a ``ptq_ascend`` block, which makes vLLM pick our plugin with no flag.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from vllm_ptq_ascend import QUANT_METHOD, __version__
from vllm_ptq_ascend.atomic import atomic_directory
from vllm_ptq_ascend.recipes import compute_dtype
from vllm_ptq_ascend.recipes import self_check as sc
from vllm_ptq_ascend.recipes.calibration import CalibrationSpec, build_calibration
from vllm_ptq_ascend.recipes.kv_cache import card_entry, kv_scale_names
from vllm_ptq_ascend.recipes.presets import build_recipe, get_preset
from vllm_ptq_ascend.recipes.recipe_yaml import make_recipe_file_plain

LIBRARIES = ("vllm_ptq_ascend", "llmcompressor", "compressed-tensors", "transformers", "torch")
CARD_JSON = "ptq_ascend_card.json"


def mark_checkpoint(ckpt_dir: Path, info: dict) -> None:
    """Add our marker block to config.json's quantization_config."""
    cfg_path = ckpt_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise ValueError(f"{cfg_path}: no quantization_config was written; nothing to mark")
    qcfg[QUANT_METHOD] = {"version": __version__, **info}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def check_recipe_fits_model(model_dir: Path, modifiers: list) -> None:
    """Before any data or weights are loaded: every group size divides the input size of
    each layer it applies to, and every ignore entry names a layer of the model.

    Uses a weightless (meta-device) copy of the model built from config.json.
    """
    import torch
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    for modifier in modifiers:
        ignore = list(getattr(modifier, "ignore", None) or [])
        for pattern in ignore:
            if not any(True for _ in match_named_modules(model, [pattern])):
                raise ValueError(f"{model_dir}: ignore entry {pattern!r} matches no layer of the model")
        for group in (getattr(modifier, "config_groups", None) or {}).values():
            scheme = QuantizationScheme.model_validate(group) if isinstance(group, dict) else group
            size = scheme.weights.group_size if scheme.weights else None
            if not size:
                continue
            bad = [
                f"{layer} (input size {m.in_features})"
                for layer, m in match_named_modules(model, scheme.targets, ignore)
                if isinstance(m, torch.nn.Linear) and m.in_features % size
            ]
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                raise ValueError(
                    f"{model_dir}: group size {size} does not divide the input size of "
                    f"{', '.join(bad[:3])}{more}; choose a group size that divides every input size, "
                    "add those layers to the ignore list, or use per-channel scales (group size 'channel')"
                )


@contextmanager
def cpu_without_pinned_memory():
    """llmcompressor's AWQ pins its activation cache for faster host->device copies; with no
    accelerator torch refuses ("Cannot access accelerator device when none is available").
    Pinning only speeds up copies, so on such machines it is skipped for the run."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin


@contextmanager
def single_process_calibration():
    """``quantize()`` calibrates in this one process. A process that also holds a torch.distributed
    group (a vLLM engine started in-process does) would make llmcompressor all-reduce AWQ's
    statistics over it as if it were a multi-rank run, which fails without an accelerator
    ("'NoneType' object has no attribute 'type'"). compressed-tensors' ``as_single_threaded``
    turns that off; a real multi-rank launch (torchrun) is left alone."""
    import os

    from compressed_tensors.offload import as_single_threaded

    if "TORCHELASTIC_RUN_ID" in os.environ:
        yield
        return
    with as_single_threaded():
        yield


def model_card(info: dict[str, Any]) -> str:
    """A short human-readable README for the checkpoint."""
    calib = info["calibration"]
    lines = [
        f"# {Path(info['source_model']).name} quantized with `{info['recipe']}`",
        "",
        f"Made by vllm-ptq-ascend {info['libraries']['vllm_ptq_ascend']} in {info['seconds']} s.",
        f"Serve it with `vllm serve DIR` (the `{QUANT_METHOD}` plugin is picked from config.json).",
        "",
        f"- recipe: `{info['recipe']}` {json.dumps(info['recipe_options'])} ({info['recipe_summary']})",
    ]
    if calib is None:
        lines.append("- calibration: none (round-to-nearest)")
    else:
        modes = ", ".join(f"{m}: {n}" for m, n in calib.get("mode_counts", {}).items())
        lines.append(
            f"- calibration: {calib.get('source')}, {calib.get('num_samples')} samples, "
            f"{calib.get('num_tokens')} tokens, modes {{{modes}}}, seed {calib.get('seed')}"
        )
    if info.get("calibration_dtype"):
        lines.append(f"- computed in {info['calibration_dtype']}, written in bfloat16")
    kv = info.get("kv_cache")
    if kv:
        per = "KV head" if kv.get("strategy") == "attn_head" else "attention layer"
        served = {"fp8": "vLLM serves it with an fp8 cache on CPU and CUDA"}.get(
            kv["kind"], "vLLM-Ascend serves it with its int8 (C8) cache, on Ascend only"
        )
        lines.append(
            f"- KV cache: {kv['kind']} ({kv['format']}), one static scale per {per} for keys and "
            f"for values ({kv['observer']} over the calibration set); {served}"
        )
    mixed = info.get("mixed_precision")
    if mixed:
        final = mixed["checkpoint"]
        lines.append(
            f"- mixed precision: budget {mixed['budget']} {'met' if mixed['met'] else 'NOT met'}; "
            f"{len(mixed['kept_units'])} of {mixed['units_total']} units kept at {mixed['fallback']}; "
            f"this checkpoint measures KL {final['kl']:.4f}, perplexity {final['ppl_change_pct']:+.2f}% "
            f"on the scan samples (every unit at the preset: KL {mixed['uniform']['kl']:.4f}, "
            f"{mixed['uniform']['ppl_change_pct']:+.2f}%)"
        )
    flat = info.get("flatquant")
    if flat:
        lines.append(
            f"- FlatQuant: {len(flat['blocks'])} blocks calibrated in {flat['seconds']} s; mean block MSE "
            f"{flat['initial_mse_mean']:.4g} (identity transforms) -> {flat['best_mse_mean']:.4g} (learned)"
        )
        tp = flat.get("tp", 1)
        lines.append(
            f"- tensor parallelism: o_proj/down_proj transforms block-diagonal over {tp} ranks, so it serves "
            f"at a tensor_parallel_size dividing {tp}"
            if tp > 1
            else "- tensor parallelism: o_proj/down_proj transforms are dense, so it serves at "
            "tensor_parallel_size 1 (quantize with --tp N to serve at N)"
        )
        if flat.get("o_proj_transform") == "per-head":
            lines.append(
                "- o_proj transform per attention head: the within-head factor folded into v_proj, the "
                "head factor applied online"
            )
        if flat.get("smooth_down_proj"):
            lines.append("- down_proj smoothing learned, its inverse folded into up_proj's output rows")
    if info.get("self_check"):
        lines.append(sc.card_line(info["self_check"]))
    lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items()))
    lines.append(f"\nFull details: `{CARD_JSON}`.\n")
    return "\n".join(lines)


def flatquant_summary(modifiers: list) -> dict | None:
    """Per-block losses FlatQuantModifier recorded (before and after learning), or None."""
    from vllm_ptq_ascend.recipes.flatquant import FlatQuantModifier

    flat = [m for m in modifiers if isinstance(m, FlatQuantModifier)]
    if not flat or not flat[0].history:
        return None
    blocks = flat[0].history
    mean = lambda key: sum(b[key] for b in blocks.values()) / len(blocks)  # noqa: E731
    return {
        "blocks": blocks,
        "initial_mse_mean": mean("initial_mse"),
        "best_mse_mean": mean("best_mse"),
        "seconds": round(sum(b["seconds"] for b in blocks.values()), 1),
        "tp": flat[0].tp,  # row-parallel transforms are block-diagonal over this many ranks
        "o_proj_transform": flat[0].o_proj_transform,
        "smooth_down_proj": flat[0].smooth_down_proj,
    }


def quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    recipe: str = "w8a8-dynamic",
    *,
    calibration: CalibrationSpec | None = None,
    overwrite: bool = False,
    budget: str | None = None,
    fallback: str | None = None,
    scan_calibration: CalibrationSpec | None = None,
    scan_file: str | Path | None = None,
    progress: bool = True,
    self_check: bool = True,
    max_kl: float | None = None,
    max_ppl_ratio: float | None = None,
    force: bool = False,
    calibration_dtype: str = "auto",
    kv_cache: str | None = None,
    **recipe_options,
) -> Path:
    """Quantize ``model_dir`` with preset ``recipe`` into ``out_dir``; returns ``out_dir``.

    ``calibration`` defaults to ``CalibrationSpec()`` (shipped reasoning text) for presets
    that need data; presets that need none refuse one. Every argument is checked before
    the model is loaded. ``budget`` ("kl=0.05", "ppl=5") keeps the layers the preset hurts most
    at ``fallback`` ("w8a8", "w8a16" or "none") until the budget is met (``recipes/mixed.py``),
    measured on ``scan_calibration`` samples; ``scan_file`` reuses the ranking of a `sensitivity` run.

    Before it is published, the written checkpoint is loaded back and measured against the
    original on held-out text (``recipes/self_check.py``). A result beyond the preset's limits
    (``max_kl``, ``max_ppl_ratio`` override them) raises ``SelfCheckFailed`` and writes nothing,
    unless ``force``: then it is written and its card records the failure. ``self_check=False``
    skips the check (recorded on the card). ``calibration_dtype`` (auto, float32, bfloat16): auto is
    float32 on a CPU without native bf16, where bf16 is emulated and far slower (``compute_dtype.py``);
    the checkpoint is written in bf16 either way. ``kv_cache`` ("fp8", "int8") also calibrates KV-cache
    scales for keys and values (``recipes/kv_cache.py``); it needs calibration data, so a preset that
    calibrates nothing gets the default set.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    preset = get_preset(recipe)
    modifiers = build_recipe(recipe, **recipe_options)
    if kv_cache is not None:
        from vllm_ptq_ascend.recipes.kv_cache import with_kv_cache

        modifiers = with_kv_cache(modifiers, kv_cache, recipe)
    if preset.needs_calibration or kv_cache is not None:
        calibration = calibration or CalibrationSpec()
    elif calibration is not None:
        raise ValueError(
            f"recipe {recipe!r} uses no calibration data (round-to-nearest); pass no calibration"
        )
    mixed_budget = None
    if budget is not None:
        from vllm_ptq_ascend.recipes.mixed import Budget, fallback_args

        if any(type(m).__name__ == "FlatQuantModifier" for m in modifiers) and fallback not in (None, "w8a8"):
            raise ValueError(
                f"--fallback {fallback} with {recipe!r}: a kept layer keeps its learned FlatQuant input "
                "transform, which needs per-token int activations; the fallback for FlatQuant is w8a8"
            )
        mixed_budget = Budget.parse(budget)
        if fallback is not None:
            fallback_args(fallback)  # checks the name
    elif fallback is not None or scan_calibration is not None or scan_file is not None:
        raise ValueError("fallback and scan samples apply only with a budget (--budget kl=X or ppl=X)")
    if self_check:
        limits = sc.limits_for(recipe, max_kl, max_ppl_ratio)
    elif force or max_kl is not None or max_ppl_ratio is not None:
        raise ValueError(
            "force, max_kl and max_ppl_ratio (--force, --max-kl, --max-ppl-ratio) apply only "
            "with the self-check; drop them or --no-self-check"
        )
    check_recipe_fits_model(model_dir, modifiers)
    dtype = compute_dtype.calibration_dtype(calibration_dtype)

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_kwargs: dict[str, Any] = {}
    calib_summary = None
    if calibration is not None:
        from vllm_ptq_ascend.env import repo_cache_root

        dataset, calib_summary = build_calibration(
            model_dir, tokenizer, calibration, cache_dir=repo_cache_root() / "calibration"
        )
        data_kwargs = dict(
            dataset=dataset,
            num_calibration_samples=len(dataset),
            max_seq_length=calibration.max_seq_length,
            shuffle_calibration_samples=False,  # the calibration set is already shuffled by its seed
        )
    mixed = None
    if mixed_budget is not None:
        from vllm_ptq_ascend.recipes.mixed import plan_mixed_precision

        mixed, scan_ref = plan_mixed_precision(
            model_dir,
            recipe,
            recipe_options,
            modifiers,
            mixed_budget,
            fallback,
            scan_calibration,
            progress,
            scan_file,
        )
    with atomic_directory(out_dir) as tmp:
        torch.manual_seed(calibration.seed if calibration else 0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        with cpu_without_pinned_memory(), single_process_calibration():
            oneshot(model=model, recipe=modifiers, **data_kwargs)
        model.save_pretrained(tmp, save_compressed=True)
        if dtype != compute_dtype.CHECKPOINT_DTYPE:
            # KV scales stay float32, the dtype vLLM loads them into (bf16 would move them by up to 0.4%)
            keep = compute_dtype.transform_tensor_names(model) | kv_scale_names(model)
            compute_dtype.cast_checkpoint(tmp, keep=keep)
        tokenizer.save_pretrained(tmp)
        make_recipe_file_plain(tmp / "recipe.yaml")
        mark_checkpoint(tmp, {"recipe": recipe, "recipe_options": recipe_options, "kv_cache": kv_cache})
        del model  # the checks below load what was written
        gc.collect()
        if mixed is not None:
            from vllm_ptq_ascend.recipes.mixed import measure_checkpoint

            mixed["checkpoint"] = measure_checkpoint(tmp, scan_ref)
            mixed["met"] = mixed_budget.met_values(mixed["checkpoint"])
        check = {"skipped": True}
        if self_check:
            check = sc.self_check(model_dir, tmp, tokenizer, limits)
            check["forced"] = bool(force and not check["passed"])
        info = {
            "recipe": recipe,
            "recipe_options": recipe_options,
            "recipe_summary": preset.summary,
            "source_model": str(model_dir.resolve()),
            "calibration": calib_summary,
            "calibration_dtype": str(dtype).removeprefix("torch."),
            "kv_cache": card_entry(kv_cache) if kv_cache else None,
            "mixed_precision": mixed,
            "flatquant": flatquant_summary(modifiers),
            "self_check": check,
            "seconds": round(time.time() - start, 1),
            "libraries": {p: version(p.replace("_", "-")) for p in LIBRARIES},
        }
        (tmp / CARD_JSON).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(info))
        if not check.get("skipped") and not check["passed"] and not force:
            raise sc.SelfCheckFailed(sc.failure_message(check, out_dir), check)  # tmp is removed
    return out_dir
