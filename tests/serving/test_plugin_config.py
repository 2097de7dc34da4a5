"""Plugin registration, method detection, and the config's layer -> scheme mapping."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.layer_helpers import W8A8_DYNAMIC, ct_config, w4a8, wna16


def test_plugin_is_an_entry_point_and_cheap_to_import():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "ptq_ascend"]
    assert ep.value == "vllm_ptq_ascend.plugin:register"
    # importing the plugin module must not import vLLM (it runs in every vLLM process)
    code = "import sys, vllm_ptq_ascend.plugin; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from vllm_ptq_ascend.plugin import register
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    register()
    register()
    assert QUANTIZATION_METHODS.count("ptq_ascend") == 1
    assert get_quantization_config("ptq_ascend") is PtqAscendConfig


@pytest.mark.parametrize(
    "qcfg,user,expected",
    [
        ({"quant_method": "compressed-tensors"}, None, None),  # plain llmcompressor: stock vLLM
        ({"quant_method": "compressed-tensors"}, "ptq_ascend", "ptq_ascend"),
        ({"quant_method": "compressed-tensors", "ptq_ascend": {"version": "0.1.0"}}, None, "ptq_ascend"),
        # the user may still force stock vLLM on our checkpoint
        (
            {"quant_method": "compressed-tensors", "ptq_ascend": {"version": "0.1.0"}},
            "compressed-tensors",
            None,
        ),
        ({"quant_method": "gptq"}, "ptq_ascend", None),
    ],
)
def test_override_quantization_method(qcfg, user, expected):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    assert PtqAscendConfig.override_quantization_method(qcfg, user) == expected


class FakeQKV(torch.nn.Module):
    """Stands in for vLLM's QKVParallelLinear in name matching (class name contains 'Linear')."""


FakeQKV.__name__ = "QKVParallelLinear"


def make_config(groups: dict, ignore=()):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    cfg = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": groups,
        "ignore": list(ignore),
    }
    c = PtqAscendConfig.from_config(cfg)
    c.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    return c


W4 = {"targets": ["re:.*mlp.*"], "weights": wna16(4, 32, True)}
W8 = {"targets": ["re:.*self_attn.*"], "weights": wna16(8, None, True)}


def test_regex_targets_ignore_and_unmatched():
    c = make_config({"g4": W4, "g8": W8}, ignore=["re:.*layers\\.1\\.mlp.*"])
    layer = FakeQKV()
    assert c.group_for("model.layers.0.mlp.gate_up_proj", layer) == "g4"
    assert c.group_for("model.layers.0.self_attn.qkv_proj", layer) == "g8"
    assert c.group_for("model.layers.1.mlp.down_proj", layer) is None  # ignored
    assert c.group_for("lm_head", torch.nn.Module()) is None  # unmatched -> unquantized
    s = c.scheme_for("model.layers.0.self_attn.qkv_proj", layer)
    assert s.describe() == "W8A16 (per-channel, symmetric)"
    assert s.shards == [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]


def test_fused_layer_with_mixed_schemes_is_rejected():
    from vllm_ptq_ascend.validation import CheckpointError

    k_only = {"targets": ["re:.*k_proj$"], "weights": wna16(8, None, True)}
    rest = {"targets": ["re:.*(q|v)_proj$"], "weights": wna16(4, 32, True)}
    c = make_config({"k": k_only, "qv": rest})
    with pytest.raises(
        CheckpointError, match=r"fused layer 'model.layers.0.self_attn.qkv_proj' mixes.*k_proj -> k"
    ):
        c.group_for("model.layers.0.self_attn.qkv_proj", FakeQKV())


def test_fused_layer_partly_ignored_is_rejected():
    c = make_config({"g": {"targets": ["Linear"], "weights": wna16(4, 32, True)}}, ignore=["re:.*k_proj$"])
    with pytest.raises(Exception, match="qkv_proj"):
        c.group_for("model.layers.0.self_attn.qkv_proj", FakeQKV())


@pytest.mark.parametrize(
    "group,fmt,match",
    [
        ({"targets": ["Linear"], "weights": wna16(4, 32, True)}, "marlin-24", "format 'marlin-24'"),
        ({"targets": ["Linear"], "weights": wna16(3, 32, True)}, "pack-quantized", "3-bit"),
        (
            {
                "targets": ["Linear"],
                "weights": {**W8A8_DYNAMIC[0], "type": "float"},
                "input_activations": W8A8_DYNAMIC[1],
            },
            "int-quantized",
            "weight type 'float'",
        ),
        (
            {
                "targets": ["Linear"],
                "weights": W8A8_DYNAMIC[0],
                "input_activations": {**W8A8_DYNAMIC[1], "num_bits": 4},
            },
            "int-quantized",
            "not a supported scheme",
        ),
        (  # W4A8 with asymmetric int4 weights
            {
                "targets": ["Linear"],
                "weights": {**w4a8(32)[0], "symmetric": False},
                "input_activations": w4a8(32)[1],
            },
            "pack-quantized",
            "not a supported scheme; supported: .*W4A8 int",
        ),
        (  # W4A8 with static activations
            {
                "targets": ["Linear"],
                "weights": w4a8(None)[0],
                "input_activations": {**w4a8(None)[1], "dynamic": False, "strategy": "tensor"},
            },
            "int-quantized",
            "not a supported scheme; supported: .*W4A8 int",
        ),
    ],
)
def test_unsupported_groups_fail_at_startup_naming_the_group(group, fmt, match):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig
    from vllm_ptq_ascend.validation import CheckpointError

    cfg = {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"grp_x": group}}
    with pytest.raises(CheckpointError, match=rf"config_groups\['grp_x'\].*{match}"):
        PtqAscendConfig.from_config(cfg)


def test_invalid_config_is_a_clear_error():
    from vllm_ptq_ascend.serving.config import PtqAscendConfig
    from vllm_ptq_ascend.validation import CheckpointError

    with pytest.raises(CheckpointError, match="config.json: quantization_config is not valid"):
        PtqAscendConfig.from_config(
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"targets": "Linear", "weights": {"num_bits": "eight"}}},
            }
        )


def test_act_order_group_checkpoints_are_accepted():
    """compressed-tensors 0.19 rejects actorder='group'; we read such checkpoints via g_idx."""
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    c = PtqAscendConfig.from_config(ct_config(wna16(4, 128, True, "group")))
    assert dict(c.plans["group_0"].options)["act_order"] is True
    c = PtqAscendConfig.from_config(ct_config(wna16(4, 128, True, "weight")))
    assert dict(c.plans["group_0"].options)["act_order"] is False  # "weight" order stores no g_idx


@pytest.mark.parametrize("fmt", ["int-quantized", "pack-quantized"])
@pytest.mark.parametrize("group_size", [64, None])
def test_w4a8_groups_map_to_the_w4a8_scheme(fmt, group_size):
    from vllm_ptq_ascend.schemes import W4A8IntScheme
    from vllm_ptq_ascend.schemes.registry import build_scheme
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    plan = PtqAscendConfig.from_config(ct_config(*w4a8(group_size), fmt=fmt)).plans["group_0"]
    assert (plan.format, plan.scheme) == ("compressed-tensors", "W4A8")
    assert plan.settings == {"group_size": group_size, "packed": fmt == "pack-quantized"}
    scheme = build_scheme(plan, "model.layers.0.mlp.down_proj", {}, ["model.layers.0.mlp.down_proj"])
    assert type(scheme) is W4A8IntScheme
    assert scheme.describe().startswith("W4A8 int")
