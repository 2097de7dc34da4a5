"""Put the pure-torch emulation of torch_npu (tests/npu_emulation) in place of torch_npu, for tests only."""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

EMULATION_DIR = Path(__file__).parent / "npu_emulation" / "torch_npu"


@lru_cache(maxsize=None)
def emulation_module():
    """The emulated torch_npu module (loaded once, without touching sys.path)."""
    spec = importlib.util.spec_from_file_location(
        "torch_npu", EMULATION_DIR / "__init__.py", submodule_search_locations=[str(EMULATION_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EMULATED
    return module


def use_npu_emulation(monkeypatch):
    """``import torch_npu`` yields the emulation (an Atlas A2, ``SOC_NAME``'s default) until the test ends."""
    module = emulation_module()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setitem(sys.modules, "torch_npu.npu", module.npu)
    return module


def use_chip(monkeypatch, soc_name: str):
    """The emulated torch_npu is the chip ``soc_name`` ("Ascend910_9391", "Ascend310P3") for the test."""
    module = use_npu_emulation(monkeypatch)
    assert soc_name in module.SOC_VERSIONS, soc_name
    monkeypatch.setattr(module, "SOC_NAME", soc_name)
    return module
