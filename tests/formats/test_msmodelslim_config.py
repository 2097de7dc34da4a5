"""msModelSlim quant_model_description.json at the config level (no engine, no layers): the file
vLLM is asked for, dispatch of labels to schemes, fused shards, and rejection of unknown, missing,
disagreeing or unserved labels, each naming the layer.
"""

from __future__ import annotations

import pytest
import torch

from tests.msmodelslim_reference import ATTN, _config


def test_description_is_requested_from_vllm_and_dispatched():
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    assert PtqAscendConfig.get_config_filenames() == ["quant_model_description.json"]
    c = _config(
        {f"{ATTN}.{p}.weight": "W8A16" for p in ("q_proj", "k_proj", "v_proj")} | {"lm_head.weight": "FLOAT"}
    )
    s = c.scheme_for(f"{ATTN}.qkv_proj", torch.nn.Module())
    assert s.describe().startswith("msModelSlim W8A16")
    assert s.shards == [f"{ATTN}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert c.scheme_for("lm_head", torch.nn.Module()) is None  # FLOAT


def test_unknown_label_is_rejected_naming_the_layer():
    from vllm_ptq_ascend.validation import CheckpointError

    with pytest.raises(
        CheckpointError, match=rf"quant_model_description.json: tensor '{ATTN}.q_proj.weight'.*'W3A7'"
    ):
        _config({f"{ATTN}.q_proj.weight": "W3A7"})


def test_missing_label_is_rejected_naming_the_layer():
    from vllm_ptq_ascend.validation import CheckpointError

    c = _config({f"{ATTN}.q_proj.weight": "W8A8", f"{ATTN}.k_proj.weight": "W8A8"})
    with pytest.raises(
        CheckpointError, match=rf"no label for '{ATTN}.v_proj.weight' \(layer '{ATTN}.qkv_proj'\)"
    ):
        c.scheme_for(f"{ATTN}.qkv_proj", torch.nn.Module())


def test_fused_shards_with_different_labels_are_rejected():
    from vllm_ptq_ascend.validation import CheckpointError

    mlp = "model.layers.1.mlp"
    c = _config({f"{mlp}.gate_proj.weight": "W8A8_DYNAMIC", f"{mlp}.up_proj.weight": "FLOAT"})
    with pytest.raises(CheckpointError, match=rf"fused layer '{mlp}.gate_up_proj'.*up_proj -> FLOAT"):
        c.scheme_for(f"{mlp}.gate_up_proj", torch.nn.Module())


def test_unserved_label_is_rejected_naming_the_layer():
    from vllm_ptq_ascend.validation import CheckpointError

    c = _config({"model.layers.0.mlp.down_proj.weight": "W4A4_DYNAMIC"})
    with pytest.raises(
        CheckpointError, match=r"layer 'model.layers.0.mlp.down_proj' has label 'W4A4_DYNAMIC'.*not serve yet"
    ):
        c.scheme_for("model.layers.0.mlp.down_proj", torch.nn.Module())
