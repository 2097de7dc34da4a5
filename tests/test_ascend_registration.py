"""Our schemes in vLLM-Ascend's scheme registry (vllm_ptq_ascend/ascend.py), against a stub registry.

vLLM-Ascend cannot be imported here, so tests/vllm_ascend_stub.py stands in for
``vllm_ascend.quantization.methods`` with the registry's behaviour (dict keyed by
(quant_type, layer_type), ValueError on a duplicate key). The W4A16 adapter then runs end to end
as vLLM-Ascend's ``AscendLinearMethod`` drives a scheme (vllm_ascend/quantization/method_adapters.py
at 182b75ea84ff13ece27b57391331ef8935410aea: parameters from get_weight / get_pertensor_param /
get_perchannel_param / get_pergroup_param registered under their names, process_weights_after_loading,
apply(layer, x, bias, tp_rank)) on the emulated torch_npu, against a float64 reference.
"""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch
import vllm_ascend_stub
from npu_helpers import use_npu_emulation

from vllm_ptq_ascend import plugin
from vllm_ptq_ascend.ascend import (
    MsModelSlimW4A8DynamicLinear,
    MsModelSlimW4A8FlatQuantLinear,
    MsModelSlimW4A16Linear,
    MsModelSlimW8A8FlatQuantLinear,
)

KEY = ("W4A16", "linear")
W4A8_KEY = ("W4A8_DYNAMIC", "linear")
W8A8_FQ_KEY = ("W8A8_FLATQUANT_DYNAMIC", "linear")
W4A8_FQ_KEY = ("W4A8_FLATQUANT_DYNAMIC", "linear")
W4A4_FQ_KEY = ("W4A4_FLATQUANT_DYNAMIC", "linear")  # vLLM-Ascend has it (methods/w4a4_flatquant.py)
OURS = {
    KEY: MsModelSlimW4A16Linear,
    W4A8_KEY: MsModelSlimW4A8DynamicLinear,
    W8A8_FQ_KEY: MsModelSlimW8A8FlatQuantLinear,
    W4A8_FQ_KEY: MsModelSlimW4A8FlatQuantLinear,
}


@pytest.fixture
def stub(monkeypatch):
    return vllm_ascend_stub.install(monkeypatch, vllm_ascend_stub.make_methods_module())


def test_keys_added_once(stub):
    plugin.register()
    plugin.register()
    assert set(stub._SCHEME_REGISTRY) == set(OURS)  # never W4A4_FLATQUANT_DYNAMIC, even when free
    for key, adapter in OURS.items():
        cls = stub.get_scheme_class(*key)
        assert issubclass(cls, adapter) and issubclass(cls, vllm_ascend_stub.AscendLinearScheme)


def test_existing_key_is_left_alone(stub, caplog):
    class TheirW4A16:
        pass

    class TheirW4A8:
        pass

    class TheirW4A4FlatQuant:
        pass

    class TheirW8A8FlatQuant:
        pass

    class TheirW4A8FlatQuant:
        pass

    theirs = {
        KEY: TheirW4A16,
        W4A8_KEY: TheirW4A8,
        W4A4_FQ_KEY: TheirW4A4FlatQuant,
        W8A8_FQ_KEY: TheirW8A8FlatQuant,
        W4A8_FQ_KEY: TheirW4A8FlatQuant,
    }
    for key, cls in theirs.items():
        stub.register_scheme(*key)(cls)
    with caplog.at_level(logging.INFO, logger="vllm_ptq_ascend.ascend"):
        plugin.register()
    assert stub._SCHEME_REGISTRY == theirs
    for cls in (TheirW4A16, TheirW4A8, TheirW8A8FlatQuant, TheirW4A8FlatQuant):
        assert f"already has {cls.__name__}" in caplog.text


def test_flatquant_keys_added_next_to_vllm_ascends_w4a4_flatquant(stub):
    class TheirW4A4FlatQuant:  # as vLLM-Ascend registers it
        pass

    stub.register_scheme(*W4A4_FQ_KEY)(TheirW4A4FlatQuant)
    plugin.register()
    assert stub._SCHEME_REGISTRY[W4A4_FQ_KEY] is TheirW4A4FlatQuant
    assert issubclass(stub.get_scheme_class(*W8A8_FQ_KEY), MsModelSlimW8A8FlatQuantLinear)
    assert issubclass(stub.get_scheme_class(*W4A8_FQ_KEY), MsModelSlimW4A8FlatQuantLinear)


def test_w4a8_key_added_when_only_w4a16_is_taken(stub):
    class TheirW4A16:
        pass

    stub.register_scheme(*KEY)(TheirW4A16)
    plugin.register()
    plugin.register()
    assert stub._SCHEME_REGISTRY[KEY] is TheirW4A16
    assert issubclass(stub.get_scheme_class(*W4A8_KEY), MsModelSlimW4A8DynamicLinear)


def test_duplicate_raised_by_register_scheme_is_caught(stub, caplog, monkeypatch):
    monkeypatch.setattr(stub, "get_scheme_class", lambda *k: None)  # the key appears between check and add
    for key in OURS:
        stub._SCHEME_REGISTRY[key] = object
    with caplog.at_level(logging.INFO, logger="vllm_ptq_ascend.ascend"):
        plugin.register()
    assert stub._SCHEME_REGISTRY == dict.fromkeys(OURS, object)
    assert "Scheme already registered" in caplog.text


def test_vllm_ascend_absent(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm_ascend", None)  # import raises ImportError
    from vllm_ptq_ascend.ascend import register_ascend_schemes

    with caplog.at_level(logging.DEBUG, logger="vllm_ptq_ascend.ascend"):
        plugin.register()
        assert register_ascend_schemes() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_other_registry_api_warns_and_skips(monkeypatch, caplog):
    methods = vllm_ascend_stub.install(monkeypatch, vllm_ascend_stub.make_methods_module(with_api=False))
    with caplog.at_level(logging.WARNING, logger="vllm_ptq_ascend.ascend"):
        plugin.register()
    assert methods._SCHEME_REGISTRY == {}
    assert "register_scheme, get_scheme_class" in caplog.text


# -- the W4A16 adapter end to end ------------------------------------------------------------------
def _pack(q: torch.Tensor, dim: int) -> torch.Tensor:
    """msModelSlim 1.0.0 int4 pairs in int8, low nibble = even index (format/common/pack.py)."""
    q = q.to(torch.int16).movedim(dim, 0)
    p = ((q[1::2] << 4) | (q[0::2] & 0xF)).to(torch.uint8).view(torch.int8)
    return p.movedim(0, dim).contiguous()


def _create_weights(scheme, layer, in_f, out_f, dtype, layer_type):
    """vLLM-Ascend's AscendLinearMethod.create_weights, minus the weight loader attributes."""
    from vllm.model_executor.utils import set_weight_attrs

    weights = scheme.get_weight(in_f, out_f, dtype)
    packed = weights.pop("_packed_dim", None), weights.pop("_packed_factor", None)
    for name, t in weights.items():
        p = torch.nn.Parameter(t, requires_grad=False)
        set_weight_attrs(p, {"input_dim": 1, "output_dim": 0})
        if packed[0] is not None:
            set_weight_attrs(p, {"packed_dim": packed[0], "packed_factor": packed[1]})
        layer.register_parameter(name, p)
    for name, t in scheme.get_pertensor_param(dtype, layer_type=layer_type).items():
        # vLLM-Ascend: a PerTensorScaleParameter loaded by the layer's v1 loader (whole, unchecked)
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    params = scheme.get_perchannel_param(out_f, dtype)
    params.update(scheme.get_pergroup_param(in_f, out_f, dtype, layer_type=layer_type))
    for name, t in params.items():
        p = torch.nn.Parameter(t, requires_grad=False)
        set_weight_attrs(p, {"output_dim": 0})
        layer.register_parameter(name, p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "group,version,layer_type",
    [(32, "1.0.0", "others"), (0, "1.0.0", "row"), (64, "0", "row"), (0, "0", "others")],
)
def test_w4a16_adapter_matches_float64(group, version, layer_type, dtype, monkeypatch, vllm_dist):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    use_npu_emulation(monkeypatch)
    desc = {"model_quant_type": "W4A16", "version": version, "group_size": group}
    vllm_config = SimpleNamespace(quant_config=SimpleNamespace(quant_description=desc))
    monkeypatch.setattr("vllm.config.get_current_vllm_config", lambda: vllm_config)

    g = torch.Generator().manual_seed(group + len(version))
    out_f, in_f = 48, 128
    n_groups = in_f // group if group else 1
    q = torch.randint(-8, 8, (out_f, in_f), generator=g)
    scale = torch.rand(out_f, n_groups, generator=g) * 0.02 + 1e-3
    offset = torch.randint(-3, 4, (out_f, n_groups), generator=g).float()
    if group == 0:
        offset.zero_()  # per channel symmetric; the group cases carry zero points
    if version == "1.0.0":  # along the output dim per group, the input dim per channel (ascendv1.py)
        weight = _pack(q, 0 if group else 1)
    else:
        weight = q.to(torch.int8)
    tensors = {"weight": weight, "weight_scale": scale, "weight_offset": offset}

    scheme = MsModelSlimW4A16Linear()  # built with no arguments, as create_scheme_for_layer does
    layer = torch.nn.Module()
    layer.prefix = "model.layers.0.mlp.down_proj"
    _create_weights(scheme, layer, in_f, out_f, dtype, layer_type)
    for name, t in tensors.items():
        param = getattr(layer, name)
        assert param.shape == t.shape, name
        param.data.copy_(t)  # vLLM's default loader on one rank
    scheme.process_weights_after_loading(layer)
    assert layer.ptq_npu_wo is not None  # on npu_weight_quant_batchmatmul, not a fallback

    x = torch.randn(5, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    out = scheme.apply(layer, x, bias, tp_rank=0)
    gs = group or in_f
    deq = (q.double() - offset.double().repeat_interleave(gs, 1)) * scale.double().repeat_interleave(gs, 1)
    ref = x.double() @ deq.t() + bias.double()
    rel = float((out.double() - ref).norm() / ref.norm())
    assert out.dtype == dtype and out.shape == (5, out_f)
    assert rel < (2e-3 if dtype == torch.float16 else 2**-8), rel


# -- the W4A8_DYNAMIC adapter end to end -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "group,version,layer_type",
    [(64, "1.0.0", "row"), (32, "1.0.0", "others"), (0, "1.0.0", "row"), (128, None, "others")],
)
def test_w4a8_dynamic_adapter_matches_float64(group, version, layer_type, dtype, monkeypatch, vllm_dist):
    from test_msmodelslim import _stage_w4, w4a8_scale_bias

    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    use_npu_emulation(monkeypatch)
    desc = {"model_quant_type": "W4A8_DYNAMIC"}
    if version is not None:
        desc |= {"version": version, "group_size": group}
    else:  # the legacy saver writes neither: vLLM-Ascend's default group of 256 applies
        group = 256
    vllm_config = SimpleNamespace(quant_config=SimpleNamespace(quant_description=desc))
    monkeypatch.setattr("vllm.config.get_current_vllm_config", lambda: vllm_config)

    g = torch.Generator().manual_seed(group + 7)
    out_f, in_f = 48, 512
    prefix = "model.layers.0.mlp." + ("down_proj" if layer_type == "row" else "up_proj")
    q, s1, s2 = _stage_w4(torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.05, group)
    tensors = {
        "weight": _pack(q, 0) if version == "1.0.0" else q,  # along the output dim (w4a8_pack_int4)
        "weight_scale": s1.float(),
        "weight_offset": torch.zeros_like(s1).float(),
    }
    scale = s1.float().double()
    if s2 is not None:
        tensors["weight_scale_second"] = s2.float()
        tensors["weight_offset_second"] = torch.zeros_like(s2).to(torch.int64)
        scale = scale * s2.float().double().repeat_interleave(group, 1)
    if version == "1.0.0":
        tensors["scale_bias"] = w4a8_scale_bias(prefix, q, s1, s2)

    scheme = MsModelSlimW4A8DynamicLinear()
    layer = torch.nn.Module()
    layer.prefix = prefix
    _create_weights(scheme, layer, in_f, out_f, dtype, layer_type)
    assert set(tensors) == {n for n, _ in layer.named_parameters()}
    for name, t in tensors.items():
        param = getattr(layer, name)
        assert param.shape == t.shape, name
        param.data.copy_(t)
    scheme.process_weights_after_loading(layer)
    # on the emulated torch_npu ops (npu_quant_matmul per channel, else the weight-quant matmul)
    assert layer.ptq_npu_w4a8 == ("int8" if group == 0 else "weight_only")

    x = torch.randn(5, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    out = scheme.apply(layer, x, bias, tp_rank=0)
    from reference import quant_per_token

    ref = quant_per_token(x.double()) @ (q.double() * scale).t() + bias.double()
    rel = float((out.double() - ref).norm() / ref.norm())
    assert out.dtype == dtype and out.shape == (5, out_f)
    assert rel < (3e-3 if dtype == torch.float16 else 2**-7), rel


def test_w4a8_dynamic_adapter_refuses_a_tampered_scale_bias(monkeypatch, vllm_dist):
    from test_msmodelslim import _stage_w4, w4a8_scale_bias

    from vllm_ptq_ascend.validation import CheckpointError

    desc = {"model_quant_type": "W4A8_DYNAMIC", "version": "1.0.0", "group_size": 64}
    vllm_config = SimpleNamespace(quant_config=SimpleNamespace(quant_description=desc))
    monkeypatch.setattr("vllm.config.get_current_vllm_config", lambda: vllm_config)
    q, s1, s2 = _stage_w4(torch.randn(32, 128, dtype=torch.float64), 64)
    scheme = MsModelSlimW4A8DynamicLinear()
    layer = torch.nn.Module()
    layer.prefix = "model.layers.0.self_attn.o_proj"
    _create_weights(scheme, layer, 128, 32, torch.bfloat16, "row")
    sb = w4a8_scale_bias(layer.prefix, q, s1, s2)
    sb[3, 7] += 100.0
    for name, t in {
        "weight": _pack(q, 0),
        "weight_scale": s1.float(),
        "weight_scale_second": s2.float(),
        "scale_bias": sb,
    }.items():
        getattr(layer, name).data.copy_(t)
    with pytest.raises(CheckpointError, match=r"o_proj', tensor 'scale_bias': disagrees.*row 3, column 7"):
        scheme.process_weights_after_loading(layer)


def test_w4a8_dynamic_adapter_refuses_an_unknown_version(monkeypatch):
    from vllm_ptq_ascend.validation import CheckpointError

    desc = {"model_quant_type": "W4A8_DYNAMIC", "version": "2.0.0", "group_size": 64}
    vllm_config = SimpleNamespace(quant_config=SimpleNamespace(quant_description=desc))
    monkeypatch.setattr("vllm.config.get_current_vllm_config", lambda: vllm_config)
    with pytest.raises(CheckpointError, match=r"description version '2.0.0'"):
        MsModelSlimW4A8DynamicLinear()


# -- the FlatQuant adapters end to end -------------------------------------------------------------
FQ_ADAPTERS = {
    "W8A8_FLATQUANT_DYNAMIC": MsModelSlimW8A8FlatQuantLinear,
    "W4A8_FLATQUANT_DYNAMIC": MsModelSlimW4A8FlatQuantLinear,
}


def _use_description(monkeypatch, quant_type, version="1.0.0"):
    desc = {"model_quant_type": quant_type, "version": version, "group_size": 0}
    vllm_config = SimpleNamespace(quant_config=SimpleNamespace(quant_description=desc))
    monkeypatch.setattr("vllm.config.get_current_vllm_config", lambda: vllm_config)


def _flatquant_layer(quant_type, prefix, dtype, layer_type, left_only=False, clip=0.9, out_f=48, seed=0):
    """An adapter and its layer as vLLM-Ascend builds and loads them; the float64 pieces of a reference."""
    from test_msmodelslim import flatquant_tensors, fq_factor

    g = torch.Generator().manual_seed(seed)
    left = fq_factor(8, g)  # vLLM-Ascend's get_decompose_dim(128) = (8, 16): the shapes it registers
    right = None if left_only else fq_factor(16, g)
    w = torch.randn(out_f, 128, generator=g, dtype=torch.float64)
    tensors, deq = flatquant_tensors(quant_type, w, left, right, clip, name=prefix)
    scheme = FQ_ADAPTERS[quant_type]()
    layer = torch.nn.Module()
    layer.prefix = prefix
    _create_weights(scheme, layer, 128, out_f, dtype, layer_type)
    assert set(tensors) | {"right_trans"} == {n for n, _ in layer.named_parameters()}
    for name, t in tensors.items():
        param = getattr(layer, name)
        assert param.shape == t.shape, name  # vLLM's v1 loader asserts equal shapes
        param.data.copy_(t)
    return scheme, layer, left, right, deq


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "quant_type,layer_type,prefix,left_only",
    [
        ("W8A8_FLATQUANT_DYNAMIC", "others", "model.layers.0.mlp.up_proj", False),
        ("W8A8_FLATQUANT_DYNAMIC", "row", "model.layers.0.self_attn.o_proj", True),  # no right_trans
        ("W4A8_FLATQUANT_DYNAMIC", "row", "model.layers.0.mlp.down_proj", False),  # scale_bias [out, 16]
        ("W4A8_FLATQUANT_DYNAMIC", "others", "model.layers.0.self_attn.q_proj", False),
    ],
)
def test_flatquant_adapter_matches_float64(
    quant_type, layer_type, prefix, left_only, dtype, monkeypatch, vllm_dist
):
    from test_msmodelslim import flatquant_act

    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    use_npu_emulation(monkeypatch)
    _use_description(monkeypatch, quant_type)
    scheme, layer, left, right, deq = _flatquant_layer(quant_type, prefix, dtype, layer_type, left_only)
    scheme.process_weights_after_loading(layer)
    assert layer.ptq_npu_act == "torch" and layer.ptq_npu_gemm == "int8"  # 8-bit FlatQuant on the NPU
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 128, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    out = scheme.apply(layer, x, bias, tp_rank=0)
    ref = flatquant_act(x, left=left, right=right, bits=8, clip=0.9) @ deq.t() + bias.double()
    rel = float((out.double() - ref).norm() / ref.norm())
    assert out.dtype == dtype and out.shape == (5, 48)
    assert rel < (3e-3 if dtype == torch.float16 else 2**-7), rel


def test_flatquant_adapter_fused_layer_keeps_the_last_shards_clip_ratio(monkeypatch, vllm_dist, caplog):
    """vLLM-Ascend's v1 loader copies every shard's clip_ratio into one [1] tensor: the last one stays."""
    from test_msmodelslim import flatquant_act

    from vllm_ptq_ascend import ascend
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "torch")
    monkeypatch.setattr(ascend, "_FUSED_CLIP_NOTED", False)
    _use_description(monkeypatch, "W8A8_FLATQUANT_DYNAMIC")
    prefix = "model.layers.0.mlp.gate_up_proj"
    scheme, layer, left, right, deq = _flatquant_layer(
        "W8A8_FLATQUANT_DYNAMIC", prefix, torch.float32, "others", clip=0.95
    )
    layer.output_partition_sizes = [24, 24]
    with caplog.at_level(logging.WARNING, logger="vllm_ptq_ascend.ascend"):
        scheme.process_weights_after_loading(layer)
    assert "keeps one clip_ratio, the last shard's" in caplog.text and prefix in caplog.text
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    ref = flatquant_act(x, left=left, right=right, bits=8, clip=0.95) @ deq.t()
    assert float((scheme.apply(layer, x).double() - ref).norm() / ref.norm()) < 3e-3


def test_flatquant_adapters_refuse_split_inputs_and_unknown_versions(monkeypatch):
    import vllm.distributed

    from vllm_ptq_ascend.validation import CheckpointError

    _use_description(monkeypatch, "W4A8_FLATQUANT_DYNAMIC", version="0")
    with pytest.raises(CheckpointError, match=r"'W4A8_FLATQUANT_DYNAMIC' with description version '0'"):
        MsModelSlimW4A8FlatQuantLinear()
    _use_description(monkeypatch, "W8A8_FLATQUANT_DYNAMIC")
    scheme = MsModelSlimW8A8FlatQuantLinear()
    scheme.get_weight(64, 48, torch.bfloat16)
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: 2)
    assert set(scheme.get_pertensor_param(torch.bfloat16, layer_type="others")) == {
        "left_trans",
        "right_trans",
        "clip_ratio",
    }
    with pytest.raises(CheckpointError, match=r"row-parallel layers cannot be split .* 2 tensor-parallel"):
        scheme.get_pertensor_param(torch.bfloat16, layer_type="row")
