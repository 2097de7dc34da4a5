"""Named quantization presets built from llmcompressor's own modifiers.

Only the calibration-free round-to-nearest presets live here for now; the
calibrated ones (SmoothQuant, GPTQ, AWQ, W4A8) arrive with the recipe issue.
"""

from __future__ import annotations

from typing import Callable

PRESETS: dict[str, Callable[..., list]] = {}


def preset(name: str):
    def register(fn):
        PRESETS[name] = fn
        return fn

    return register


def _ignore(ignore: list[str] | None) -> list[str]:
    return list(ignore) if ignore is not None else ["lm_head"]


@preset("w8a8-dynamic")
def w8a8_dynamic(ignore: list[str] | None = None) -> list:
    """int8 per-channel weights (RTN), int8 per-token dynamic activations; no calibration data."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=_ignore(ignore))]


@preset("w4a16-rtn")
def w4a16_rtn(ignore: list[str] | None = None, group_size: int = 128) -> list:
    """int4 symmetric group-wise weights (RTN), float activations; no calibration data."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [
        QuantizationModifier(
            config_groups={
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "group",
                        "group_size": group_size,
                    },
                }
            },
            ignore=_ignore(ignore),
        )
    ]


def build_recipe(name: str, **options) -> list:
    if name not in PRESETS:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**options)
