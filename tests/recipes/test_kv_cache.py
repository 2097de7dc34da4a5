"""``quantize --kv-cache fp8|int8``: llmcompressor calibrates scales for keys and values (fp8: one per
attention layer; int8: one per KV head); checked against an independent float64 computation, and bad
combinations refused before any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import KV_CALIBRATION
from vllm_ptq_ascend.recipes.calibration import CalibrationSpec

FP8_E4M3_MAX = 448.0
INT8_HALF_RANGE = 127.5  # compressed-tensors' symmetric int scale: max|x| / ((q_max - q_min) / 2)
CALIB = CalibrationSpec(**KV_CALIBRATION)  # make_ckpt's


@pytest.fixture(scope="module")
def kv_ckpt(make_ckpt):
    """Round-to-nearest W8A8 weights plus an fp8 KV cache, calibrated in float32 (on CALIB)."""
    return make_ckpt("w8a8-dynamic-kv-fp8")


@pytest.fixture(scope="module")
def int8_kv_ckpt(make_ckpt):
    """The same weights with an int8 KV cache (one scale per KV head), for vLLM-Ascend's C8 cache."""
    return make_ckpt("w8a8-dynamic-kv-int8")


def float64_kv_maxima(model_dir, samples, per_head: bool = False) -> dict[int, tuple]:
    """max |k| (after RoPE) and max |v| per layer over the samples, from the float64 model: floats, or
    with ``per_head`` a tensor over the KV heads each."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    maxima: dict[int, tuple] = {}

    def observe(module, query, key, value, *args, **kwargs):
        # key, value: [batch, kv heads, tokens, head_dim]
        k_new, v_new = (t.abs().amax(dim=(0, 2, 3)) for t in (key, value))
        k, v = maxima.get(module.layer_idx, (torch.zeros_like(k_new), torch.zeros_like(v_new)))
        maxima[module.layer_idx] = (torch.maximum(k, k_new), torch.maximum(v, v_new))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("observe_kv", observe)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="observe_kv"
    )
    with torch.no_grad():
        for s in samples:
            model(torch.tensor([s.input_ids]))
    if per_head:
        return maxima
    return {i: (float(k.max()), float(v.max())) for i, (k, v) in maxima.items()}


def test_kv_scales_are_the_calibration_maxima_over_448(kv_ckpt, tiny_model):
    """static_minmax over the calibration tokens: scale = max|k| / 448, on keys after RoPE. A data-free
    preset's weights are quantized after calibration, so the keys are the float model's."""
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.recipes.calibration import build_samples

    samples, _ = build_samples(tiny_model, AutoTokenizer.from_pretrained(tiny_model), CALIB, None)
    maxima = float64_kv_maxima(tiny_model, samples)
    sd = load_file(kv_ckpt / "model.safetensors")
    assert len(maxima) == 2
    for i, (k_max, v_max) in maxima.items():
        k_scale, v_scale = (sd[f"model.layers.{i}.self_attn.{t}_scale"] for t in "kv")
        assert k_scale.dtype == v_scale.dtype == torch.float32  # not cast to the checkpoint's bf16
        assert float(k_scale) == pytest.approx(k_max / FP8_E4M3_MAX, rel=1e-5)
        assert float(v_scale) == pytest.approx(v_max / FP8_E4M3_MAX, rel=1e-5)


def test_int8_kv_scales_are_the_per_head_maxima_over_127_5(int8_kv_ckpt, tiny_model):
    """attn_head: one scale per KV head, shape [heads, 1, 1], from that head's largest |k| and |v|."""
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.recipes.calibration import build_samples

    samples, _ = build_samples(tiny_model, AutoTokenizer.from_pretrained(tiny_model), CALIB, None)
    maxima = float64_kv_maxima(tiny_model, samples, per_head=True)
    sd = load_file(int8_kv_ckpt / "model.safetensors")
    heads = json.loads((tiny_model / "config.json").read_text())["num_key_value_heads"]
    for i, (k_max, v_max) in maxima.items():
        for name, peak in (("k", k_max), ("v", v_max)):
            scale = sd[f"model.layers.{i}.self_attn.{name}_scale"]
            assert scale.dtype == torch.float32 and tuple(scale.shape) == (heads, 1, 1)
            torch.testing.assert_close(scale.flatten().double(), peak / INT8_HALF_RANGE, rtol=1e-5, atol=0)
        assert not torch.equal(k_max[0], k_max[1])  # the heads do get scales of their own


def test_int8_kv_cache_is_recorded_for_ascend(int8_kv_ckpt):
    qcfg = json.loads((int8_kv_ckpt / "config.json").read_text())["quantization_config"]
    scheme = qcfg["kv_cache_scheme"]
    assert (scheme["type"], scheme["num_bits"], scheme["strategy"], scheme["symmetric"]) == (
        "int",
        8,
        "attn_head",
        True,
    )
    card = json.loads((int8_kv_ckpt / "ptq_ascend_card.json").read_text())
    assert card["kv_cache"] == {
        "kind": "int8",
        "strategy": "attn_head",
        "observer": "static_minmax",
        "format": "int8",
    }
    assert "int8 (C8) cache, on Ascend only" in (int8_kv_ckpt / "README.md").read_text()


def test_kv_cache_is_recorded_in_config_card_and_recipe(kv_ckpt):
    qcfg = json.loads((kv_ckpt / "config.json").read_text())["quantization_config"]
    scheme = qcfg["kv_cache_scheme"]
    fields = (scheme["type"], scheme["num_bits"], scheme["strategy"], scheme["dynamic"])
    assert fields == ("float", 8, "tensor", False)
    assert qcfg["ptq_ascend"]["kv_cache"] == "fp8"
    card = json.loads((kv_ckpt / "ptq_ascend_card.json").read_text())
    assert card["kv_cache"]["observer"] == "static_minmax"
    assert card["calibration"]["num_samples"] == 8  # a data-free preset calibrates for its KV scales
    assert "KV cache: fp8" in (kv_ckpt / "README.md").read_text()
    assert "kv_cache_scheme" in (kv_ckpt / "recipe.yaml").read_text()


def test_kv_cache_goes_on_the_last_quantization_modifier():
    from llmcompressor.modifiers.quantization import GPTQModifier

    from vllm_ptq_ascend.recipes.kv_cache import with_kv_cache
    from vllm_ptq_ascend.recipes.presets import build_recipe

    smooth, gptq = with_kv_cache(build_recipe("w8a8-smoothquant"), "fp8", "w8a8-smoothquant")
    assert isinstance(gptq, GPTQModifier) and gptq.kv_cache_scheme.observer == "static_minmax"
    assert gptq.requires_calibration_data
    assert getattr(smooth, "kv_cache_scheme", None) is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kv_cache": "fp4"}, "--kv-cache must be one of fp8, int8"),
    ],
)
def test_bad_kv_cache_requests_are_refused_before_loading(tiny_model, tmp_path, kwargs, message):
    from vllm_ptq_ascend.recipes.quantize import quantize

    with pytest.raises(ValueError, match=message):
        quantize(tiny_model, tmp_path / "out", "w8a8-dynamic", **kwargs)
    assert not (tmp_path / "out").exists()


def test_kv_cache_under_a_budget_keeps_both(tiny_model, tmp_path):
    """--budget with --kv-cache: the kept units get the fallback group, the KV scales are calibrated
    as without a budget, and the written checkpoint (KV quantization included) meets the budget."""
    from vllm_ptq_ascend.recipes.quantize import quantize

    scan = CalibrationSpec(num_samples=2, max_seq_length=64)
    options = dict(calibration_dtype="float32", group_size=32, progress=False)
    out = quantize(tiny_model, tmp_path / "o", "w4a8", kv_cache="fp8", budget="kl=0.02", calibration=CALIB,
                   scan_calibration=scan, **options)  # fmt: skip
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    card = json.loads((out / "ptq_ascend_card.json").read_text())
    assert card["mixed_precision"]["met"] and card["mixed_precision"]["kept_units"]
    (fallback,) = [g for g in qcfg["config_groups"].values() if g["targets"] != ["Linear"]]
    assert fallback["targets"] == card["mixed_precision"]["kept_layers"]
    assert fallback["weights"]["num_bits"] == 8  # the W8A8 fallback group
    assert qcfg["kv_cache_scheme"]["type"] == "float" and card["kv_cache"]["kind"] == "fp8"
    sd = load_file(out / "model.safetensors")
    for i in range(2):
        for t in "kv":
            scale = sd[f"model.layers.{i}.self_attn.{t}_scale"]
            assert scale.dtype == torch.float32 and float(scale) > 0


def test_cli_refuses_an_unknown_kv_cache_by_name(tiny_model, tmp_path, capsys):
    from vllm_ptq_ascend.cli import main

    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tiny_model), "--out", str(tmp_path / "o"), "--kv-cache", "fp4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-cache: invalid choice: 'fp4'" in err and "int8" in err
    assert not (tmp_path / "o").exists()
