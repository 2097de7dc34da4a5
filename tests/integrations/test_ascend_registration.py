"""Registration with vLLM-Ascend when it is absent (the CPU and CUDA case).

Everything that needs vLLM-Ascend runs against its real code in tests/integrations/test_ascend_real_code.py.
"""

from __future__ import annotations

import logging
import sys

from vllm_ptq_ascend import plugin


def test_vllm_ascend_absent_is_quiet(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm_ascend", None)  # not installed
    from vllm_ptq_ascend.integrations.vllm_ascend import register_ascend_schemes

    with caplog.at_level(logging.DEBUG, logger="vllm_ptq_ascend.integrations.vllm_ascend"):
        plugin.register()
        assert register_ascend_schemes() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vllm_ptq")]
    assert "not installed" in caplog.text


def test_compressed_tensors_checkpoints_stay_with_vllm_without_vllm_ascend():
    from tests.layer_helpers import ct_config, wna16
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    plugin.register()
    assert PtqAscendConfig.override_quantization_method(ct_config(wna16(8, 64, True)), None) is None
