"""msModelSlim FlatQuant (W4A4/W8A8/W4A8_FLATQUANT_DYNAMIC) on single vLLM layers (no engine): the cpu,
torch and emulated-npu backends against x·(left ⊗ right) in float64, per-shard clip ratios of fused
layers, bad tensors rejected naming the tensor, and dispatch / tensor-parallel refusal.
"""

from __future__ import annotations

import pytest
import torch

from tests.msmodelslim_reference import (
    ATTN,
    DOWN,
    FQ_BITS,
    _config,
    _desc_config,
    flatquant_act,
    flatquant_tensors,
    fq_factor,
    fq_sizes,
)

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


def test_flatquant_dispatch_and_versions():
    from vllm_ptq_ascend.schemes.msmodelslim_flatquant import modelslim_factor_sizes
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
    kernels = [scheme.kernel for _, scheme, _, _ in layer.scheme.inner.blocks]  # one per clip ratio
    assert [k.name for k in kernels] == ["NpuKroneckerKernel"] * 3
    assert [round(k.transform.clip_ratio, 6) for k in kernels] == list(clips)
    act = [flatquant_act(x, left=left, right=right, bits=4, clip=c) for c in clips]
    ref = torch.cat([a @ d.t() for a, d in zip(act, deqs)], -1)
    one_clip = act[-1] @ torch.cat(deqs).t()
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 0.5 * _rel(out, one_clip)
