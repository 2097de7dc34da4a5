"""Calibration in float32 on CPUs without native bf16, and the bf16 checkpoint written from it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_ptq_ascend.cpu_features import native_bf16
from vllm_ptq_ascend.recipes.compute_dtype import calibration_dtype
from vllm_ptq_ascend.recipes.quantize import CARD_JSON, quantize


def test_auto_follows_the_cpu_and_names_are_checked(monkeypatch):
    assert not native_bf16({"avx2", "fma", "avx512f"}) and native_bf16({"avx512_bf16"})
    assert native_bf16({"amx_bf16"}) and native_bf16({"fp", "asimd", "bf16"})  # Arm's Features
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr("vllm_ptq_ascend.recipes.compute_dtype.native_bf16", lambda: False)
    assert calibration_dtype() is torch.float32
    monkeypatch.setattr("vllm_ptq_ascend.recipes.compute_dtype.native_bf16", lambda: True)
    assert calibration_dtype() is torch.bfloat16
    assert calibration_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="one of auto, float32, bfloat16.*'fp16'"):
        calibration_dtype("fp16")


def test_a_float32_run_writes_bf16_with_the_float32_integer_weights(tiny_model, tmp_path):
    """W8A8 round-to-nearest computed in float32: the int8 weights are round(w / s) of the float32
    weights and scales, not of bf16-rounded ones (those move about 10% of them here); every float
    tensor is written in bf16."""
    from transformers import AutoModelForCausalLM

    out = quantize(tiny_model, tmp_path / "q", "w8a8-dynamic", calibration_dtype="float32", self_check=False)
    written = load_file(out / "model.safetensors")
    assert {t.dtype for t in written.values() if t.is_floating_point()} == {torch.bfloat16}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert json.loads((out / CARD_JSON).read_text())["calibration_dtype"] == "float32"
    source = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    q = written[name]
    assert q.dtype == torch.int8

    def rtn(w, scale_dtype):  # compressed-tensors: per channel, absmax over half its 255-step range
        scale = (w.double().abs().amax(dim=1, keepdim=True) / 127.5).to(scale_dtype)
        return scale, torch.round(w.to(scale_dtype) / scale).clamp(-128, 127).to(torch.int8)

    scale64, q64 = rtn(source[name], torch.float64)
    assert (q.int() - q64.int()).abs().max() <= 1  # float64: only float32's x.5 ties differ
    assert (q != q64).float().mean() < 1e-2
    scale32, q32 = rtn(source[name], torch.float32)
    assert torch.equal(q, q32)  # exactly llmcompressor's float32 arithmetic
    assert (rtn(source[name].bfloat16(), torch.bfloat16)[1] != q).float().mean() > 0.05
    assert torch.equal(written[name.replace("weight", "weight_scale")], scale32.to(torch.bfloat16))
    # an unquantized tensor is the source's, cast
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(written[norm], source[norm].to(torch.bfloat16))


def test_flatquant_factors_keep_their_float32_in_a_float32_run(tiny_model, tmp_path):
    """The transforms' own precision is float32 whatever the model's dtype: a float32 run writes them
    as a bf16 run does, and the rest in bf16."""
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec

    written = {}
    for dtype in ("float32", "bfloat16"):
        out = quantize(
            tiny_model, tmp_path / dtype, "w8a8-flatquant", epochs=0, calibration_dtype=dtype,
            calibration=CalibrationSpec(num_samples=4, max_seq_length=32), self_check=False,
        )  # fmt: skip
        written[dtype] = {k: t.dtype for k, t in load_file(out / "model.safetensors").items()}
    assert written["float32"] == written["bfloat16"]
    factors = [k for k in written["float32"] if ".flatquant_input." in k or ".flatquant_heads_input." in k]
    assert factors and {written["float32"][k] for k in factors} == {torch.float32}
    assert written["float32"]["model.layers.0.input_layernorm.weight"] == torch.bfloat16
