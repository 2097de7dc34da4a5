"""msModelSlim W4A8_DYNAMIC on single vLLM layers (no engine): the packed, two-level-scale, per-channel
and legacy layouts against a float64 reference, bad tensors rejected naming the tensor, the
description versions / group sizes the config accepts, and compressed-tensors configs still parsing.
"""

from __future__ import annotations

import pytest
import torch

from tests.msmodelslim_reference import DOWN, _desc_config, _stage_w4, pack_int4_along_out, w4a8_scale_bias
from tests.reference import quant_per_token


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


def test_legacy_w4a8_dynamic_without_group_size_uses_256():
    s = _desc_config({f"{DOWN}.weight": "W4A8_DYNAMIC"}).scheme_for(DOWN, torch.nn.Module())
    assert s.group_size == 256 and not s.packed and "scale_bias" not in s.tensor_names


def test_compressed_tensors_configs_still_parse_as_before():
    from tests.layer_helpers import ct_config, wna16
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    c = PtqAscendConfig.from_config(ct_config(wna16(4, 32, True)))
    assert c.modelslim is None and "group_0" in c.plans
