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
from vllm_ptq_ascend.ascend import MsModelSlimW4A8DynamicLinear, MsModelSlimW4A16Linear

KEY = ("W4A16", "linear")
W4A8_KEY = ("W4A8_DYNAMIC", "linear")


@pytest.fixture
def stub(monkeypatch):
    return vllm_ascend_stub.install(monkeypatch, vllm_ascend_stub.make_methods_module())


def test_keys_added_once(stub):
    plugin.register()
    plugin.register()
    assert set(stub._SCHEME_REGISTRY) == {KEY, W4A8_KEY}
    for key, adapter in ((KEY, MsModelSlimW4A16Linear), (W4A8_KEY, MsModelSlimW4A8DynamicLinear)):
        cls = stub.get_scheme_class(*key)
        assert issubclass(cls, adapter) and issubclass(cls, vllm_ascend_stub.AscendLinearScheme)


def test_existing_key_is_left_alone(stub, caplog):
    class TheirW4A16:
        pass

    class TheirW4A8:
        pass

    stub.register_scheme(*KEY)(TheirW4A16)
    stub.register_scheme(*W4A8_KEY)(TheirW4A8)
    with caplog.at_level(logging.INFO, logger="vllm_ptq_ascend.ascend"):
        plugin.register()
    assert stub._SCHEME_REGISTRY == {KEY: TheirW4A16, W4A8_KEY: TheirW4A8}
    assert "already has TheirW4A16" in caplog.text and "already has TheirW4A8" in caplog.text


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
    stub._SCHEME_REGISTRY[KEY] = stub._SCHEME_REGISTRY[W4A8_KEY] = object
    with caplog.at_level(logging.INFO, logger="vllm_ptq_ascend.ascend"):
        plugin.register()
    assert stub._SCHEME_REGISTRY == {KEY: object, W4A8_KEY: object}
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
    assert scheme.get_pertensor_param(dtype, layer_type=layer_type) == {}
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
