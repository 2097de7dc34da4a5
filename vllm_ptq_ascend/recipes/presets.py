"""Named quantization presets: llmcompressor recipes built from llmcompressor's own modifiers.

Each preset is a Python builder (keyword knobs -> list of modifiers). Its default
form also ships as YAML (``recipes/yaml/NAME.yaml``) for ``llmcompressor.oneshot(recipe=PATH)``;
the YAML is generated from the builder (``python -m vllm_ptq_ascend.recipes.presets``)
and a test keeps the two in step. Calibration knobs (number and length of samples,
CoT modes) belong to the calibration data, not the recipe: see ``calibration.py``.

Presets that fold scales into the model (SmoothQuant, AWQ, FlatQuant) take the decoder block's
structure from the model's family (``families.py``): SmoothQuant and AWQ run as llmcompressor's
modifiers given the family's explicit mappings at initialization (``FamilySmoothQuantModifier``,
``FamilyAWQModifier``), never llmcompressor's per-class defaults, and every fold is checked
against the family or refused by name.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

YAML_DIR = Path(__file__).with_name("yaml")
MODULE = "vllm_ptq_ascend.recipes.presets"  # also when run as __main__
DEFAULT_IGNORE = ("lm_head",)
ACTORDERS = ("static", "weight", None)  # "group" is refused by llmcompressor 0.14's GPTQ


@dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[..., list]
    needs_calibration: bool
    summary: str

    def options(self) -> dict[str, Any]:
        """The knobs this preset takes, with their defaults."""
        return {p.name: p.default for p in inspect.signature(self.build).parameters.values()}


PRESETS: dict[str, Preset] = {}


def preset(name: str, needs_calibration: bool):
    def register(fn):
        PRESETS[name] = Preset(name, fn, needs_calibration, inspect.getdoc(fn).splitlines()[0])
        return fn

    return register


# -- config groups (compressed-tensors QuantizationArgs as plain dicts) --------------


def _weights(bits: int, group_size: int | None, symmetric: bool = True):
    """int weights per group of ``group_size`` input channels, or per output channel if None."""
    if group_size is not None and (type(group_size) is not int or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (per channel), got {group_size!r}")
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size is None else "group",
        "group_size": group_size,
    }


def _gptq(groups: dict, ignore, actorder: str | None):
    """GPTQ on ``groups``. actorder is set on the modifier: in the weights' args, None would
    be overridden by GPTQModifier's own default ("static")."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    if actorder not in ACTORDERS:
        raise ValueError(f"actorder must be one of {ACTORDERS}, got {actorder!r}")
    return GPTQModifier(config_groups=groups, ignore=_ignore(ignore), actorder=actorder)


def _activations(kind: str, bits: int = 8):
    """int activations: per-token scales computed at run time, or one calibrated per-tensor scale."""
    if kind == "dynamic":
        return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    if kind == "static":
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    raise ValueError(f"activations must be 'dynamic' or 'static', got {kind!r}")


def _groups(weights: dict, activations: dict | None = None, fmt: str | None = None) -> dict:
    group: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
    if activations is not None:
        group["input_activations"] = activations
    if fmt is not None:  # otherwise llmcompressor infers it
        group["format"] = fmt
    return {"group_0": group}


def _ignore(ignore) -> list[str]:
    return list(DEFAULT_IGNORE if ignore is None else ignore)


# -- presets ----------------------------------------------------------------------


@preset("w8a8-dynamic", needs_calibration=False)
def w8a8_dynamic(ignore: list[str] | None = None) -> list:
    """W8A8 round-to-nearest: int8 per-channel weights, int8 per-token dynamic activations; no data."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [
        QuantizationModifier(
            config_groups=_groups(_weights(8, None), _activations("dynamic")), ignore=_ignore(ignore)
        )
    ]


@preset("w8a8-smoothquant", needs_calibration=True)
def w8a8_smoothquant(
    ignore: list[str] | None = None, activations: str = "dynamic", smoothing_strength: float = 0.8
) -> list:
    """W8A8 SmoothQuant + GPTQ: int8 per-channel weights, int8 per-token dynamic (or static) activations."""
    # Dynamic by default: on SmolLM2-135M one static scale per tensor costs many times the
    # perplexity of per-token scales (benchmarks/results/recipes_smollm2.md). Static saves the
    # run-time reduction on NPUs and suits large models, whose activations smooth well.
    from vllm_ptq_ascend.recipes.families import FamilySmoothQuantModifier

    if not 0.0 <= smoothing_strength <= 1.0:
        raise ValueError(f"smoothing_strength must lie in [0, 1], got {smoothing_strength!r}")
    return [
        FamilySmoothQuantModifier(smoothing_strength=smoothing_strength),
        _gptq(_groups(_weights(8, None), _activations(activations)), ignore, "static"),
    ]


@preset("w4a16-awq", needs_calibration=True)
def w4a16_awq(ignore: list[str] | None = None, group_size: int | None = 128) -> list:
    """W4A16 AWQ: int4 asymmetric (zero point) weights per group of 128, float activations."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from vllm_ptq_ascend.recipes.families import FamilyAWQModifier

    groups = _groups(_weights(4, group_size, symmetric=False), fmt="pack-quantized")
    return [FamilyAWQModifier(), QuantizationModifier(config_groups=groups, ignore=_ignore(ignore))]


@preset("w4a16-gptq", needs_calibration=True)
def w4a16_gptq(
    ignore: list[str] | None = None, group_size: int | None = 128, actorder: str | None = "static"
) -> list:
    """W4A16 GPTQ: int4 symmetric weights per group of 128 (act-order option), float activations."""
    return [_gptq(_groups(_weights(4, group_size), fmt="pack-quantized"), ignore, actorder)]


@preset("w8a16-gptq", needs_calibration=True)
def w8a16_gptq(
    ignore: list[str] | None = None, group_size: int | None = 128, actorder: str | None = "static"
) -> list:
    """W8A16 GPTQ: int8 symmetric weights per group of 128, float activations."""
    return [_gptq(_groups(_weights(8, group_size), fmt="pack-quantized"), ignore, actorder)]


@preset("w4a8", needs_calibration=True)
def w4a8(
    ignore: list[str] | None = None, group_size: int | None = 128, actorder: str | None = "static"
) -> list:
    """W4A8 GPTQ: int4 symmetric weights per group of 128 (or channel), int8 per-token dynamic activations."""
    # pack-quantized: without it llmcompressor saves the int4 values unpacked in int8 (2x the size).
    groups = _groups(_weights(4, group_size), _activations("dynamic"), fmt="pack-quantized")
    return [_gptq(groups, ignore, actorder)]


@preset("w4a16-rtn", needs_calibration=False)
def w4a16_rtn(ignore: list[str] | None = None, group_size: int | None = 128) -> list:
    """W4A16 round-to-nearest: int4 symmetric weights per group of 128; no data (a baseline)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups = _groups(_weights(4, group_size), fmt="pack-quantized")
    return [QuantizationModifier(config_groups=groups, ignore=_ignore(ignore))]


@preset("w4a4-rtn", needs_calibration=False)
def w4a4_rtn(ignore: list[str] | None = None) -> list:
    """W4A4 round-to-nearest: int4 per-channel weights, int4 per-token activations; no data (a baseline)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups = _groups(_weights(4, None), _activations("dynamic", bits=4), fmt="pack-quantized")
    return [QuantizationModifier(config_groups=groups, ignore=_ignore(ignore))]


def _spinquant(act_bits: int | None, group_size: int | None, ignore, actorder: str | None) -> list:
    """SpinQuant R1 + R2 random-Hadamard rotations folded into the weights, then GPTQ int4 weights
    (with int per-token activations of ``act_bits``, or float ones if None).
    Random, not plain, Hadamard: compressed-tensors builds plain ones only for powers of two, and
    hidden sizes such as SmolLM2's 576 are not. The random ones come from a fresh torch.Generator,
    whose seed is fixed, so every run draws the same."""
    from vllm_ptq_ascend.recipes.families import FamilySpinQuantModifier

    activations = None if act_bits is None else _activations("dynamic", bits=act_bits)
    groups = _groups(_weights(4, group_size), activations, fmt="pack-quantized")
    return [
        FamilySpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"),
        _gptq(groups, ignore, actorder),
    ]


@preset("w4a16-spinquant", needs_calibration=True)
def w4a16_spinquant(
    ignore: list[str] | None = None, group_size: int | None = 128, actorder: str | None = "static"
) -> list:
    """W4A16 SpinQuant + GPTQ: R1/R2 rotations in the weights; int4 symmetric group weights, float acts."""
    # The rotations spread weight outliers across channels as they do activation outliers, and,
    # folded into the weights, leave a plain W4A16 checkpoint: every platform's stock W4A16 kernel
    # serves it with no online transform.
    return _spinquant(None, group_size, ignore, actorder)


@preset("w4a8-spinquant", needs_calibration=True)
def w4a8_spinquant(
    ignore: list[str] | None = None, group_size: int | None = 128, actorder: str | None = "static"
) -> list:
    """W4A8 SpinQuant + GPTQ: R1/R2 rotations in the weights; int4 weights per group, int8 token acts."""
    return _spinquant(8, group_size, ignore, actorder)


@preset("w4a4-spinquant", needs_calibration=True)
def w4a4_spinquant(ignore: list[str] | None = None, actorder: str | None = "static") -> list:
    """W4A4 SpinQuant + GPTQ: R1/R2 rotations in the weights; int4 channel weights, int4 token acts."""
    return _spinquant(4, None, ignore, actorder)


@preset("w4a4-mixed", needs_calibration=True)
def w4a4_mixed(
    ignore: list[str] | None = None, actorder: str | None = "static", w8a8_mlp_layers: tuple = ()
) -> list:
    """W4A4 mixed (msModelSlim's Qwen3 layout): SpinQuant R1/R2; gate/up W4A4, attention/down_proj W8A8."""
    # msModelSlim's production W4A4 recipe (lab_practice/qwen3/qwen3-32b-dense-w4a4.yaml): rotations
    # folded into the weights, attention and down_proj at W8A8 dynamic (down_proj's input carries the
    # largest outliers), gate/up at W4A4 except in the layers it found sensitive (w8a8_mlp_layers).
    from vllm_ptq_ascend.recipes.families import FamilySpinQuantModifier

    keep = sorted({int(i) for i in w8a8_mlp_layers})
    if any(i < 0 for i in keep):
        raise ValueError(f"w8a8_mlp_layers must be layer indices (>= 0), got {list(w8a8_mlp_layers)}")
    kept = "|".join(map(str, keep))
    w8a8_targets = [r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.down_proj$"]
    w4a4_targets = [r"re:.*mlp\.(gate|up)_proj$"]
    if keep:
        w8a8_targets.append(rf"re:.*layers\.({kept})\.mlp\.(gate|up)_proj$")
        w4a4_targets = [rf"re:.*layers\.(?!({kept})\.)\d+\.mlp\.(gate|up)_proj$"]
    groups = {
        "w8a8": {
            "targets": w8a8_targets,
            "weights": _weights(8, None),
            "input_activations": _activations("dynamic"),
            "format": "int-quantized",
        },
        "w4a4": {
            "targets": w4a4_targets,
            "weights": _weights(4, None),
            "input_activations": _activations("dynamic", bits=4),
            "format": "pack-quantized",
        },
    }
    return [
        FamilySpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"),
        _gptq(groups, ignore, actorder),
    ]


@preset("w4a16-autoround", needs_calibration=True)
def w4a16_autoround(
    ignore: list[str] | None = None, group_size: int | None = 128, iters: int = 200, lr: float | None = None
) -> list:
    """W4A16 AutoRound: signed-gradient tuned rounding; int4 symmetric weights per group of 128.
    ``lr`` None is auto-round's own rule (1 / iters); its "light" recipe is 50 steps at lr 5e-3."""
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    if type(iters) is not int or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    groups = _groups(_weights(4, group_size), fmt="pack-quantized")
    # torch.compile off: inductor's CPU backend needs a C++ compiler, which quantize must not require
    modifier = AutoRoundModifier(
        config_groups=groups, ignore=_ignore(ignore), iters=iters, lr=lr, enable_torch_compile=False
    )
    return [modifier]


def _quip(act_bits: int, group_size: int | None, ignore, actorder: str | None, rotations) -> list:
    """llmcompressor's QuIPModifier: random-Hadamard rotations of every linear's input ("v") and
    output ("u"), one half fused into the weights, the other applied online when serving
    (``serving/online_transforms.py``); then GPTQ int4 weights. The rotations are per linear layer, so
    they keep any family's function: no norm is folded. Random, not plain, Hadamards for the
    reason of ``_spinquant``."""
    from llmcompressor.modifiers.transform import QuIPModifier

    groups = _groups(_weights(4, group_size), _activations("dynamic", bits=act_bits), fmt="pack-quantized")
    return [
        QuIPModifier(rotations=list(rotations), transform_type="random-hadamard", ignore=_ignore(ignore)),
        _gptq(groups, ignore, actorder),
    ]


@preset("w4a4-quip", needs_calibration=True)
def w4a4_quip(
    ignore: list[str] | None = None, actorder: str | None = "static", rotations: tuple = ("v", "u")
) -> list:
    """W4A4 QuIP + GPTQ: online random-Hadamard input/output rotations; int4 channel weights, int4 acts."""
    return _quip(4, None, ignore, actorder, rotations)


@preset("w4a8-quip", needs_calibration=True)
def w4a8_quip(
    ignore: list[str] | None = None,
    group_size: int | None = 128,
    actorder: str | None = "static",
    rotations: tuple = ("v", "u"),
) -> list:
    """W4A8 QuIP + GPTQ: online random-Hadamard input/output rotations; int4 group weights, int8 acts."""
    return _quip(8, group_size, ignore, actorder, rotations)


def _flatquant(weight_bits: int, act_bits: int, ignore, weights: str = "rtn", **options) -> list:
    """FlatQuant transforms, then per-channel weights on the transformed layers: round-to-nearest
    (FlatQuant's default) or GPTQ on the transformed, clipped activations (``weights="gptq"``).
    ``options``: FlatQuantModifier's (epochs, lr, clip_lr, init, parametrization, tp, o_proj_transform,
    smooth_down_proj)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from vllm_ptq_ascend.recipes.flatquant import FlatQuantModifier

    # int8 weights stay unpacked (int-quantized); int4 ones are packed 8 per int32
    fmt = "pack-quantized" if weight_bits == 4 else "int-quantized"
    groups = _groups(_weights(weight_bits, None), _activations("dynamic", bits=act_bits), fmt=fmt)
    # its fields refuse an init, parametrization or o_proj transform it does not know
    flat = FlatQuantModifier(weight_bits=weight_bits, act_bits=act_bits, **options)
    if weights == "gptq":
        return [flat, _gptq(groups, ignore, "static")]
    if weights != "rtn":
        raise ValueError(f"weights must be 'rtn' or 'gptq', got {weights!r}")
    return [
        flat,
        QuantizationModifier(config_groups=groups, ignore=_ignore(ignore)),
    ]


def _flatquant_preset(
    name: str,
    weight_bits: int,
    act_bits: int,
    summary: str,
    weights_default: str,
    smooth_down_default: bool,
    init_default: str,
):
    """Register FlatQuant preset ``name``; the three differ in their bit widths, weight rounding,
    down_proj smoothing and initial factors (each default chosen by measurement)."""

    def build(
        ignore: list[str] | None = None,
        epochs: int = 15,
        lr: float = 5e-3,
        clip_lr: float = 5e-2,
        # the reference's start (or a Hadamard one) and o_proj structure: on SmolLM2 they cut W4A8's
        # perplexity change from +33.8% to +11.7%, W8A8's from +2.06% to -0.23%
        # (results/flatquant_o_proj_smollm2.md, _init_, _hadamard_)
        init: str = init_default,
        parametrization: str = "direct",
        weights: str = weights_default,
        tp: int = 1,
        o_proj_transform: str = "per-head",
        smooth_down_proj: bool = smooth_down_default,
    ) -> list:
        return _flatquant(
            weight_bits,
            act_bits,
            ignore,
            weights,
            epochs=epochs,
            lr=lr,
            clip_lr=clip_lr,
            init=init,
            parametrization=parametrization,
            tp=tp,
            o_proj_transform=o_proj_transform,
            smooth_down_proj=smooth_down_proj,
        )

    build.__doc__ = summary
    preset(name, needs_calibration=True)(build)


_flatquant_preset(
    "w4a4-flatquant",
    4,
    4,
    "W4A4 FlatQuant: learned Kronecker transforms, clipping; GPTQ int4 channel weights, int4 token acts.",
    "gptq",  # SmolLM2: x2.45 perplexity beside round-to-nearest's x2.83 (results/flatquant_init_smollm2.md)
    True,  # down_proj smoothing: x2.45 -> x2.11 on SmolLM2 (results/flatquant_down_smooth_smollm2.md)
    "hadamard",  # x2.11 -> x1.67 beside random-orthogonal, same run (results/flatquant_hadamard_smollm2.md)
)
_flatquant_preset(
    "w4a8-flatquant",
    4,
    8,
    "W4A8 FlatQuant: learned Kronecker transforms, clipping; GPTQ int4 channel weights, int8 token acts.",
    "gptq",  # SmolLM2: +33.8% beside round-to-nearest's +118% (results/flatquant_weights_smollm2.md)
    False,  # down_proj smoothing: +11.7% -> +13.9% on SmolLM2 (results/flatquant_down_smooth_smollm2.md)
    "random-orthogonal",  # a Hadamard start: +11.7% -> +14.3% (results/flatquant_hadamard_smollm2.md)
)
_flatquant_preset(
    "w8a8-flatquant",
    8,
    8,
    "W8A8 FlatQuant: learned Kronecker transforms, clipping; int8 channel weights, int8 token acts.",
    "rtn",
    False,  # down_proj smoothing not measured at W8A8
    "random-orthogonal",  # a Hadamard start not measured at W8A8
)


# -- lookup -------------------------------------------------------------------------


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def build_recipe(name: str, **options) -> list:
    """The modifiers of preset ``name`` with ``options``; an option the preset lacks is an error."""
    p = get_preset(name)
    known = p.options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"recipe {name!r} takes no option {', '.join(map(repr, unknown))} "
            f"(its options: {', '.join(known) or 'none'})"
        )
    return p.build(**options)


def preset_yaml(name: str) -> str:
    """The YAML form of preset ``name`` with its default knobs (what recipes/yaml/ ships)."""
    from llmcompressor.recipe import Recipe

    from vllm_ptq_ascend.recipes.recipe_yaml import dump_recipe_dict

    header = f"# {name}: {get_preset(name).summary}\n# Generated by `python -m {MODULE}`.\n"
    modifiers = build_recipe(name)
    for m in modifiers:
        module = OUR_MODIFIERS.get(type(m).__name__)
        if module:
            header += f"# Run `import {module}` first: it registers {type(m).__name__}.\n"
    return header + dump_recipe_dict(Recipe.from_modifiers(modifiers).to_dict())


# modifiers of ours the presets use -> the module that registers them with llmcompressor
OUR_MODIFIERS = {
    "FlatQuantModifier": "vllm_ptq_ascend.recipes.flatquant",
    "FamilySmoothQuantModifier": "vllm_ptq_ascend.recipes.families",
    "FamilyAWQModifier": "vllm_ptq_ascend.recipes.families",
    "FamilySpinQuantModifier": "vllm_ptq_ascend.recipes.families",
}


def yaml_path(name: str) -> Path:
    """The shipped YAML of preset ``name``. Where llmcompressor is loaded (the YAML is about to be
    handed to it), the modifiers of ours that the YAML names are registered with it first."""
    if "llmcompressor" in sys.modules:
        import importlib

        for module in sorted(set(OUR_MODIFIERS.values())):
            importlib.import_module(module)
    return YAML_DIR / f"{get_preset(name).name}.yaml"


def write_yaml_files() -> list[Path]:
    YAML_DIR.mkdir(exist_ok=True)
    paths = []
    for name in sorted(PRESETS):
        path = yaml_path(name)
        path.write_text(preset_yaml(name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_yaml_files():
        print(f"wrote {p}")
