"""``quantize --kv-cache fp8``: llmcompressor calibrates one scale per attention layer for keys and
values; checked against an independent float64 computation, and bad combinations refused before
any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_ptq_ascend.recipes.calibration import CalibrationSpec

FP8_E4M3_MAX = 448.0
CALIB = CalibrationSpec(num_samples=8, max_seq_length=64)


@pytest.fixture(scope="module")
def kv_ckpt(tiny_model, tmp_path_factory):
    """Round-to-nearest W8A8 weights plus an fp8 KV cache, calibrated in float32."""
    from vllm_ptq_ascend.recipes.quantize import quantize

    out = tmp_path_factory.mktemp("kv") / "w8a8-kv-fp8"
    return quantize(
        tiny_model,
        out,
        "w8a8-dynamic",
        kv_cache="fp8",
        calibration=CALIB,
        calibration_dtype="float32",
        progress=False,
    )


def float64_kv_maxima(model_dir, samples) -> dict[int, tuple[float, float]]:
    """max |k| (after RoPE) and max |v| per layer over the samples, from the float64 model."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    maxima: dict[int, tuple[float, float]] = {}

    def observe(module, query, key, value, *args, **kwargs):
        k, v = maxima.get(module.layer_idx, (0.0, 0.0))
        maxima[module.layer_idx] = (max(k, float(key.abs().max())), max(v, float(value.abs().max())))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("observe_kv", observe)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="observe_kv"
    )
    with torch.no_grad():
        for s in samples:
            model(torch.tensor([s.input_ids]))
    return maxima


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
        ({"kv_cache": "int8"}, "int8 is not offered yet"),
        ({"kv_cache": "fp4"}, "--kv-cache must be one of fp8"),
        ({"kv_cache": "fp8", "budget": "kl=0.1"}, "--kv-cache with --budget is not supported"),
    ],
)
def test_bad_kv_cache_requests_are_refused_before_loading(tiny_model, tmp_path, kwargs, message):
    from vllm_ptq_ascend.recipes.quantize import quantize

    with pytest.raises(ValueError, match=message):
        quantize(tiny_model, tmp_path / "out", "w8a8-dynamic", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_int8_kv_cache_by_name(tiny_model, tmp_path, capsys):
    from vllm_ptq_ascend.cli import main

    assert main(["quantize", str(tiny_model), "--out", str(tmp_path / "o"), "--kv-cache", "int8"]) == 2
    err = capsys.readouterr().err
    assert "int8 is not offered yet" in err and "C8" in err
