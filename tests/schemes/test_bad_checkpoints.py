"""Broken checkpoints fail at load, in a real vLLM engine, with errors naming file, layer and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine_runner import run_engines
from tests.layer_helpers import (
    build_layer,
    ct_config,
    load_tensors,
    make_w4a8_tensors,
    make_wna16_tensors,
    w4a8,
    wna16,
)

pytestmark = pytest.mark.engine
FILE = "model.safetensors"


def edit_tensors(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(dst / FILE)
    edit(sd)
    save_file(sd, dst / FILE, metadata={"format": "pt"})
    return dst


def edit_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _set(sd, key, value):
    sd[key] = value


def _nan_first(sd, key):
    t = sd[key].clone()
    t.view(-1)[0] = float("nan")
    sd[key] = t


W8 = "model.layers.0.mlp.down_proj"
QKV = "model.layers.1.self_attn"
# name -> (base checkpoint, how to break it, words the error must contain)
BROKEN = {
    "missing scale": (
        "w8a8-dynamic",
        lambda sd: sd.pop(f"{W8}.weight_scale"),
        [W8, "weight_scale"],
    ),
    "missing scale of one fused shard": (
        "w8a8-dynamic",
        lambda sd: sd.pop(f"{QKV}.k_proj.weight_scale"),
        [FILE, f"{QKV}.qkv_proj", "weight_scale", "missing"],
    ),
    "wrong dtype": (
        "w8a8-dynamic",
        lambda sd: _set(sd, f"{W8}.weight", sd[f"{W8}.weight"].to(torch.float16)),
        [FILE, W8, "'weight'", "float16", "int8"],
    ),
    "wrong shape": (
        "w4a16-g64-asym",
        lambda sd: _set(sd, f"{W8}.weight_scale", sd[f"{W8}.weight_scale"][:, :-1].contiguous()),
        [FILE, W8, "weight_scale", "shape"],
    ),
    "nan scale": (
        "w4a16-g64-asym",
        lambda sd: _nan_first(sd, f"{W8}.weight_scale"),
        [FILE, W8, "weight_scale", "NaN"],
    ),
}
BAD_CONFIGS = {
    "unknown format": (
        "w8a8-dynamic",
        lambda q: [q.update(format="marlin-24"), q["config_groups"]["group_0"].update(format="marlin-24")],
        ["config.json", "group_0", "marlin-24"],
    ),
    "unsupported group size": (
        "w4a16-g64-asym",
        lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=48),
        ["weight_scale", "group size 48", "does not divide"],
    ),
    "w4a8 static activations": (
        "w4a8-g64-int",
        lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor"),
        ["config.json", "group_0", "not a supported scheme", "W4A8 int"],
    ),
}


@pytest.fixture(scope="module")
def broken_results(make_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    dirs = {}
    for i, (case, (base, edit, _)) in enumerate(BROKEN.items()):
        dirs[case] = edit_tensors(make_ckpt(base), root / f"t{i}", edit)
    for i, (case, (base, edit, _)) in enumerate(BAD_CONFIGS.items()):
        dirs[case] = edit_config(make_ckpt(base), root / f"c{i}", edit)
    jobs = [
        {"model": str(d), "quantization": "ptq_ascend", "dtype": "bfloat16", "prompts": [[1, 2, 3]]}
        for d in dirs.values()
    ]
    return dict(zip(dirs, run_engines(jobs)))


@pytest.mark.parametrize("case", [*BROKEN, *BAD_CONFIGS])
def test_broken_checkpoint_is_rejected_with_names(broken_results, case):
    expected = (BROKEN.get(case) or BAD_CONFIGS[case])[2]
    res = broken_results[case]
    assert "error" in res, f"{case}: loaded without error"
    for word in expected:
        assert word in res["error"], f"{case}: {word!r} not in {res['error']!r}"


def test_fused_shards_with_different_g_idx_are_rejected(vllm_dist):
    from vllm_ptq_ascend.validation import CheckpointError

    cfg = ct_config(wna16(4, 32, True, "group"))
    layer = build_layer(
        "MergedColumnParallelLinear",
        cfg,
        256,
        None,
        torch.bfloat16,
        output_sizes=[64, 64],
        prefix="model.layers.0.mlp.gate_up_proj",
    )
    for shard, seed in ((0, 1), (1, 2)):
        tensors = make_wna16_tensors(64, 256, 4, 32, True, True, gen=torch.Generator().manual_seed(seed))
        if shard == 0:
            load_tensors(layer, tensors, shard)
            continue
        with pytest.raises(CheckpointError, match="gate_up_proj.*weight_g_idx.*different act-order g_idx"):
            load_tensors(layer, tensors, shard)


@pytest.mark.parametrize(
    "fmt,group,edit,match",
    [
        ("pack-quantized", 48, None, r"down_proj', tensor 'weight_scale': group size 48 does not divide"),
        ("int-quantized", 32, "out of range", r"down_proj', tensor 'weight': values must lie in \[-8, 7\]"),
        ("int-quantized", None, "nan scale", r"down_proj', tensor 'weight_scale': 1 scale\(s\).*NaN"),
    ],
)
def test_bad_w4a8_layers_are_rejected(vllm_dist, fmt, group, edit, match):
    from vllm_ptq_ascend.validation import CheckpointError

    def build_and_load():
        layer = build_layer("ReplicatedLinear", ct_config(*w4a8(group), fmt=fmt), 256, 64, torch.float32)
        tensors = make_w4a8_tensors(64, 256, group, packed=fmt == "pack-quantized")
        if edit == "out of range":  # an int8 weight that is not int4
            tensors["weight"][3, 5] = 9
        if edit == "nan scale":
            tensors["weight_scale"][0, 0] = float("nan")
        load_tensors(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)

    with pytest.raises(CheckpointError, match=match):
        build_and_load()
