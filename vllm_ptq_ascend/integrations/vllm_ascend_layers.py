"""What every vLLM-Ascend adapter needs: the description vLLM-Ascend's schemes read, the layer being
built when vLLM-Ascend constructs a scheme with no arguments, and which handed-over tensors its own
``AscendLinearMethod`` narrows on a row-parallel layer."""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

import torch

ADAPTERS_MODULE = "vllm_ascend.quantization.method_adapters"


def quant_description() -> dict[str, Any]:
    """What vLLM-Ascend's schemes read: the current vLLM config's ``quant_config.quant_description``."""
    from vllm.config import get_current_vllm_config

    quant_config = getattr(get_current_vllm_config(), "quant_config", None)
    desc = getattr(quant_config, "quant_description", None)
    return desc if isinstance(desc, dict) else {}


def noop_loader(param, loaded_weight, *args, **kwargs):  # never called: vLLM-Ascend loads
    raise AssertionError("parameters of the vLLM-Ascend adapter are loaded by vLLM-Ascend")


def layer_under_construction() -> tuple[torch.nn.Module | None, str]:
    """The layer (and prefix) whose quant method is being resolved.

    vLLM-Ascend builds a scheme with no arguments (``scheme_cls()``) from inside its config's
    ``get_quant_method(layer, prefix)``, which vLLM calls from the layer's ``__init__``; the only
    way to know the layer then is that caller's frame. Returns (None, "") outside such a call."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "get_quant_method":
            layer, prefix = frame.f_locals.get("layer"), frame.f_locals.get("prefix")
            if isinstance(layer, torch.nn.Module) and isinstance(prefix, str):
                return layer, prefix
        frame = frame.f_back
    return None, ""


HOOKS = ("get_weight", "get_pertensor_param", "get_perchannel_param", "get_pergroup_param")


@functools.lru_cache(maxsize=None)
def narrowed_names(hook: str, names: tuple[str, ...]) -> frozenset[str]:
    """Which of ``names``, handed over from ``hook`` by a row-parallel layer's scheme, vLLM-Ascend's
    own ``AscendLinearMethod.create_weights`` marks with ``input_dim`` (so vLLM's row loader narrows
    them to the rank's columns). Decided by running that code on a probe scheme and layer."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    adapters = importlib.import_module(ADAPTERS_MODULE)

    class Probe:
        def _tensors(self, which):
            return {n: torch.empty(2, 2) for n in names} if which == hook else {}

        def get_weight(self, *args, **kwargs):
            return self._tensors("get_weight")

        def get_pertensor_param(self, *args, **kwargs):
            return self._tensors("get_pertensor_param")

        def get_perchannel_param(self, *args, **kwargs):
            return self._tensors("get_perchannel_param")

        def get_pergroup_param(self, *args, **kwargs):
            return self._tensors("get_pergroup_param")

    layer = object.__new__(RowParallelLinear)  # only its type matters to create_weights
    torch.nn.Module.__init__(layer)
    adapters.AscendLinearMethod(Probe()).create_weights(
        layer, 2, [2], 2, 2, torch.float32, weight_loader=noop_loader
    )
    return frozenset(n for n in names if getattr(getattr(layer, n), "input_dim", None) is not None)
