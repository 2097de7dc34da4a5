"""A stand-in for ``vllm_ascend.quantization.methods`` (vLLM-Ascend cannot be imported here: no CANN).

It mimics the registry of vllm-project/vllm-ascend at 182b75ea84ff13ece27b57391331ef8935410aea
(``vllm_ascend/quantization/methods/registry.py``): a dict keyed by (quant_type, layer_type),
``register_scheme`` a decorator raising ValueError for a key that exists, ``get_scheme_class``
returning the class or None; and the linear base of ``methods/base.py`` (``AscendLinearScheme``:
get_weight and apply abstract, the other hooks returning {} / None).
"""

from __future__ import annotations

import sys
import types
from abc import ABC, abstractmethod
from typing import Any

MODULES = ("vllm_ascend", "vllm_ascend.quantization", "vllm_ascend.quantization.methods")


class AscendLinearScheme(ABC):
    @abstractmethod
    def get_weight(self, input_size: int, output_size: int, params_dtype) -> dict[str, Any]: ...

    def get_pertensor_param(self, params_dtype, **kwargs) -> dict[str, Any]:
        return {}

    def get_perchannel_param(self, output_size: int, params_dtype) -> dict[str, Any]:
        return {}

    def get_pergroup_param(self, input_size, output_size, params_dtype, layer_type=None) -> dict[str, Any]:
        return {}

    @abstractmethod
    def apply(self, layer, x, bias=None, tp_rank=0): ...

    def process_weights_after_loading(self, layer) -> None:
        return


def make_methods_module(with_api: bool = True) -> types.ModuleType:
    m = types.ModuleType("vllm_ascend.quantization.methods")
    registry: dict[tuple[str, str], type] = {}
    m._SCHEME_REGISTRY = registry
    m.AscendLinearScheme = AscendLinearScheme
    if with_api:

        def register_scheme(quant_type: str, layer_type: str):
            def decorator(cls):
                key = (quant_type, layer_type)
                if key in registry:
                    raise ValueError(
                        f"Scheme already registered for {quant_type}/{layer_type}: {registry[key].__name__}"
                    )
                registry[key] = cls
                return cls

            return decorator

        def get_scheme_class(quant_type: str, layer_type: str):
            return registry.get((quant_type, layer_type))

        m.register_scheme, m.get_scheme_class = register_scheme, get_scheme_class
    return m


def install(monkeypatch, methods: types.ModuleType) -> types.ModuleType:
    """Put the stub package in sys.modules until the test ends."""
    root, quant = types.ModuleType(MODULES[0]), types.ModuleType(MODULES[1])
    root.quantization, quant.methods = quant, methods
    for name, mod in zip(MODULES, (root, quant, methods)):
        mod.__path__ = []  # a package, so submodule imports resolve through sys.modules
        monkeypatch.setitem(sys.modules, name, mod)
    return methods
