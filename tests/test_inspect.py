"""`vllm-ptq-ascend inspect`: clean checkpoints pass, each kind of breakage is reported by name.

No vLLM engine: inspect reads headers (and scales) only. Most cases run in-process
(``cli.main``); a few go through the real command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_ptq_ascend import cli

FILE = "model.safetensors"
MS_FILE = "quant_model_weights.safetensors"
DESC = "quant_model_description.json"
W8 = "model.layers.0.mlp.down_proj"
QKV = "model.layers.1.self_attn"


def run_inspect(path, *flags, capsys):
    rc = cli.main(["inspect", str(path), *flags])
    out, err = capsys.readouterr()
    return rc, out, err


def copy_edit(src, dst, tensors=None, config=None, desc=None, file=FILE):
    """Copy a checkpoint, then edit its tensors / quantization_config / msModelSlim description."""
    shutil.copytree(src, dst)
    if tensors:
        sd = load_file(dst / file)
        tensors(sd)
        save_file(sd, dst / file, metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if desc:
        d = json.loads((dst / DESC).read_text())
        desc(d)
        (dst / DESC).write_text(json.dumps(d))
    return dst


def _set(sd, key, value):
    sd[key] = value


def _poke(sd, key, value):
    t = sd[key].clone()
    t.view(-1)[0] = value
    sd[key] = t


def _layers(out: str) -> dict[str, str]:
    """'layer: scheme [group]' lines of the text report."""
    return {
        line.split(": ", 1)[0]: line.split(": ", 1)[1]
        for line in out.splitlines()
        if line.startswith(("model.", "lm_head")) and ": " in line
    }


# -- clean checkpoints -----------------------------------------------------------------
EXPECTED_SCHEME = {
    "w8a8-dynamic": "W8A8 int8 (per-channel weights, dynamic per-token activations)",
    "w8a8-smoothquant": "W8A8 int8 (per-channel weights, dynamic per-token activations)",
    "w8a8-smoothquant-static": "W8A8 int8 (per-channel weights, static per-tensor symmetric activations)",
    "w4a16-rtn": "W4A16 (group 128, symmetric)",
    "w4a16-gptq": "W4A16 (group 128, symmetric)",
    "w4a16-awq": "W4A16 (group 128, zero points)",
    "w8a16-gptq": "W8A16 (group 128, symmetric)",
    "w4a8": "W4A8 int",
    "w4a4-rtn": "W4A4 int",
    "w4a16-spinquant": "W4A16 (group 128, symmetric)",
    "w4a8-spinquant": "W4A8 int",
    "w4a4-spinquant": "W4A4 int",
    "w4a8-quip": "W4A8 int",
    "w4a4-quip": "W4A4 int",
    "w4a16-autoround": "W4A16 (group 128, symmetric)",
    "w4a4-flatquant": "FlatQuant W4A4",
    "w4a8-flatquant": "FlatQuant W4A8",
    "w8a8-flatquant": "FlatQuant W8A8",
}


def _expected_scheme(ckpt_dir) -> str:
    """The plugin's own describe() for the checkpoint's single group (from_config planning)."""
    from vllm_ptq_ascend.formats.compressed_tensors import flatquant_plan
    from vllm_ptq_ascend.schemes.registry import build_scheme
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    qc = json.loads((ckpt_dir / "config.json").read_text())["quantization_config"]
    (plan,) = [p for p in PtqAscendConfig.from_config(qc).plans.values() if p]
    groups = (qc.get("transform_config") or {}).get("config_groups", {}).values()
    if any(g.get("type") == "flatquant-kronecker" for g in groups):  # every FlatQuant linear has one
        plan = flatquant_plan(plan, "flatquant", "x")
    return build_scheme(plan, "x", {}, ["x"]).describe()  # also SpinQuant's: its rotations are in the weights


def test_clean_preset_checkpoints_pass(preset_ckpts, capsys):
    for name, path in preset_ckpts.items():
        rc, out, err = run_inspect(path, capsys=capsys)
        assert rc == 0, f"{name}: {out}{err}"
        layers = _layers(out)
        assert layers.pop("lm_head") == "unquantized"
        assert len(layers) == 8, out  # 2 blocks x (qkv, o, gate_up, down)
        assert "0 problem(s): OK" in out
        if name == "w4a4-mixed":  # msModelSlim's layout: gate/up W4A4, the rest W8A8
            for layer, scheme in layers.items():
                w4a4 = layer.endswith("gate_up_proj")
                assert scheme.startswith("W4A4 int" if w4a4 else "W8A8 int8"), (layer, scheme)
                assert scheme.endswith("[group_1]" if w4a4 else "[group_0]"), (layer, scheme)
            continue
        want = _expected_scheme(path)
        if name in EXPECTED_SCHEME:
            assert want.startswith(EXPECTED_SCHEME[name]), (name, want)
        assert all(s == f"{want} [group_0]" for s in layers.values()), (name, layers)


@pytest.mark.parametrize("name", ["w4a16-g64-asym", "w4a8-g32-packed", "w4a16-g32-actorder"])
def test_clean_llmcompressor_checkpoints_pass(make_ckpt, capsys, name):
    path = make_ckpt(name)
    rc, out, _ = run_inspect(path, capsys=capsys)
    assert rc == 0, out
    want = _expected_scheme(path)
    assert _layers(out)[f"{QKV}.qkv_proj"] == f"{want} [group_0]"
    assert f"{QKV}.k_proj.weight_scale" in out  # tensors are listed


@pytest.fixture(scope="module")
def modelslim_ckpts(tiny_model, tmp_path_factory):
    from tests.formats.test_msmodelslim import build

    root = tmp_path_factory.mktemp("inspect_ms")
    cases = {
        "W8A8_DYNAMIC": (dict(proj="W8A8_DYNAMIC"), 0),
        "W4A16": (dict(proj="W4A16"), 32),
        "mixed": ({"layers.0.mlp": "W8A8_DYNAMIC", "layers.1.self_attn": "W8A16"}, 0),
        # version 1.0.0 packs int4 pairs along the output dim: inspect must size the layer from that
        "W4A8_DYNAMIC": (dict(proj="W4A8_DYNAMIC"), 64),
    }
    return {n: build(tiny_model, root / n, labels, gs)[0] for n, (labels, gs) in cases.items()}


def test_clean_modelslim_checkpoints_pass(modelslim_ckpts, capsys):
    for name, path in modelslim_ckpts.items():
        rc, out, _ = run_inspect(path, capsys=capsys)
        assert rc == 0, f"{name}: {out}"
        layers = _layers(out)
        if name == "mixed":
            assert layers[f"{W8}"] == "msModelSlim W8A8_DYNAMIC"
            assert layers[f"{QKV}.qkv_proj"] == "msModelSlim W8A16"
            assert layers["model.layers.0.self_attn.qkv_proj"] == "unquantized"
        else:
            assert {s.split(" (")[0] for k, s in layers.items() if k != "lm_head"} == {f"msModelSlim {name}"}


# -- broken checkpoints: (base, edits, words every reported problem set must contain) ----
BROKEN_CT = {
    "missing tensor": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: sd.pop(f"{W8}.weight_scale")),
        [FILE, W8, "'weight_scale'", "missing"],
    ),
    "missing tensor of one fused shard": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: sd.pop(f"{QKV}.k_proj.weight_scale")),
        [FILE, f"{QKV}.k_proj", "'weight_scale'", "missing"],
    ),
    "missing weight": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: sd.pop(f"{W8}.weight")),
        [FILE, W8, "'weight'", "missing"],
    ),
    "fused shards with different input sizes": (
        "w8a8-dynamic",
        dict(
            tensors=lambda sd: _set(
                sd, f"{QKV}.v_proj.weight", sd[f"{QKV}.v_proj.weight"][:, :-8].contiguous()
            )
        ),
        [FILE, f"{QKV}.v_proj", "'weight'", "input size 248", "fused layer"],
    ),
    "fused shard without tensors": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(f"{QKV}.k_proj.")]),
        [FILE, f"{QKV}.qkv_proj", f"{QKV}.k_proj", "no tensors"],
    ),
    "extra tensor": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: _set(sd, f"{W8}.input_scale", torch.ones(1))),
        [FILE, W8, "'input_scale'", "unexpected"],
    ),
    "wrong dtype": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: _set(sd, f"{W8}.weight", sd[f"{W8}.weight"].to(torch.float16))),
        [FILE, W8, "'weight'", "float16", "int8"],
    ),
    "wrong shape": (
        "w4a16-g64-asym",
        dict(
            tensors=lambda sd: _set(sd, f"{W8}.weight_scale", sd[f"{W8}.weight_scale"][:, :-1].contiguous())
        ),
        [FILE, W8, "'weight_scale'", "shape", "expected"],
    ),
    "zero scale": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: _poke(sd, f"{W8}.weight_scale", 0.0)),
        [FILE, W8, "'weight_scale'", "zero, NaN or infinite"],
    ),
    # a weight scale's sign folds into the weights (AutoRound writes negative ones); an input scale's cannot
    "negative input scale": (
        "w8a8-static-sym",
        dict(tensors=lambda sd: _poke(sd, f"{W8}.input_scale", -1.0)),
        [FILE, W8, "'input_scale'", "zero, negative, NaN or infinite", "-1.0"],
    ),
    "nan scale": (
        "w4a16-g64-asym",
        dict(tensors=lambda sd: _poke(sd, f"{W8}.weight_scale", float("nan"))),
        [FILE, W8, "'weight_scale'", "nan"],
    ),
    "inf scale": (
        "w8a8-dynamic",
        dict(tensors=lambda sd: _poke(sd, f"{QKV}.v_proj.weight_scale", float("inf"))),
        [FILE, f"{QKV}.v_proj", "'weight_scale'", "inf"],
    ),
    "group size does not divide": (
        "w4a16-g64-asym",
        dict(config=lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=48)),
        [FILE, W8, "'weight_scale'", "group size 48 does not divide"],
    ),
    "config group matches no layer": (
        "w8a8-dynamic",
        dict(
            config=lambda q: q["config_groups"].update(
                group_1={**q["config_groups"]["group_0"], "targets": ["re:.*no_such_proj$"]}
            )
        ),
        ["config.json", "config_groups['group_1']", "no_such_proj", "matches no layer"],
    ),
    "ignore entry matches no layer": (
        "w8a8-dynamic",
        dict(config=lambda q: q["ignore"].append("model.layers.7.mlp.down_proj")),
        ["config.json", "ignore entry 'model.layers.7.mlp.down_proj'", "matches no layer"],
    ),
    "fused layer with mixed schemes": (
        "w8a8-dynamic",
        dict(config=lambda q: q["ignore"].append(f"{QKV}.k_proj")),
        ["config.json", f"{QKV}.qkv_proj", "mixes schemes", f"{QKV}.k_proj -> unquantized"],
    ),
    "unsupported scheme": (
        "w8a8-dynamic",
        dict(
            config=lambda q: [
                q.update(format="marlin-24"),
                q["config_groups"]["group_0"].update(format="marlin-24"),
            ]
        ),
        ["config.json", "group_0", "marlin-24", "not supported"],
    ),
}
BROKEN_MS = {
    "label for a missing tensor": (
        "mixed",
        dict(desc=lambda d: d.update({"model.layers.5.mlp.down_proj.weight": "W8A16"})),
        [DESC, "'model.layers.5.mlp.down_proj.weight'", "W8A16", "in no safetensors file"],
    ),
    "quantized label on a float tensor": (
        "mixed",
        dict(desc=lambda d: d.update({"model.layers.0.self_attn.o_proj.weight": "W8A16"})),
        [MS_FILE, "model.layers.0.self_attn.o_proj", "'weight'", "int8", "label W8A16"],
    ),
    "fused shards with different labels": (
        "mixed",
        dict(desc=lambda d: d.update({f"{QKV}.k_proj.weight": "W8A8_DYNAMIC"})),
        [DESC, f"{QKV}.qkv_proj", "different labels", f"{QKV}.k_proj -> W8A8_DYNAMIC"],
    ),
    "unsupported label": (
        "mixed",
        dict(desc=lambda d: d.update({f"{W8}.weight": "W4A4_DYNAMIC"})),
        [DESC, W8, "W4A4_DYNAMIC", "does not serve yet"],
    ),
    "missing msModelSlim scale": (
        "W4A16",
        dict(tensors=lambda sd: sd.pop(f"{W8}.weight_scale"), file=MS_FILE),
        [MS_FILE, W8, "'weight_scale'", "missing"],
    ),
}


@pytest.fixture(scope="module")
def broken(make_ckpt, modelslim_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect_broken")
    dirs = {}
    for i, (case, (base, edits, _)) in enumerate(BROKEN_CT.items()):
        dirs[case] = copy_edit(make_ckpt(base), root / f"ct{i}", **edits)
    for i, (case, (base, edits, _)) in enumerate(BROKEN_MS.items()):
        dirs[case] = copy_edit(modelslim_ckpts[base], root / f"ms{i}", **edits)
    return dirs


@pytest.mark.parametrize("case", [*BROKEN_CT, *BROKEN_MS])
def test_broken_checkpoint_is_reported_by_name(broken, capsys, case):
    rc, out, _ = run_inspect(broken[case], "--json", capsys=capsys)
    assert rc == 1, out
    report = json.loads(out)
    assert not report["ok"]
    words = (BROKEN_CT.get(case) or BROKEN_MS[case])[2]
    assert any(all(w in p for w in words) for p in report["problems"]), (case, words, report["problems"])


def test_every_problem_is_reported_not_just_the_first(make_ckpt, tmp_path, capsys):
    def edit(sd):
        sd.pop(f"{W8}.weight_scale")
        sd[f"{QKV}.q_proj.weight"] = sd[f"{QKV}.q_proj.weight"].to(torch.bfloat16)
        _poke(sd, "model.layers.1.mlp.up_proj.weight_scale", 0.0)

    path = copy_edit(
        make_ckpt("w8a8-dynamic"),
        tmp_path / "ckpt",
        tensors=edit,
        config=lambda q: q["ignore"].append("nothing_here"),
    )
    rc, out, _ = run_inspect(path, capsys=capsys)
    assert rc == 1
    problems = [line for line in out.splitlines() if "PROBLEM:" in line]
    assert len(problems) == 4, out
    assert "summary: 9 layers (8 quantized, 1 unquantized), 4 problem(s)" in out


# -- bad arguments ---------------------------------------------------------------------
def test_bad_arguments_exit_2(tiny_model, make_ckpt, tmp_path, capsys):
    rc, _, err = run_inspect(tmp_path / "nope", capsys=capsys)
    assert rc == 2 and "not a directory" in err
    rc, _, err = run_inspect(tiny_model, capsys=capsys)  # a float model: no quantization config
    assert rc == 2 and "no quantization config" in err
    bad = shutil.copytree(make_ckpt("w8a8-dynamic"), tmp_path / "bad")
    (bad / FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rc, _, err = run_inspect(bad, capsys=capsys)
    assert rc == 2 and FILE in err and "unreadable" in err


# -- the real command line -----------------------------------------------------------------
def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vllm_ptq_ascend.cli", "inspect", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_line(make_ckpt, broken, tmp_path):
    ok = _cli(make_ckpt("w8a8-dynamic"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{QKV}.qkv_proj: W8A8 int8" in ok.stdout and "0 problem(s): OK" in ok.stdout
    bad = _cli(broken["missing tensor"], "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert any(W8 in p and "weight_scale" in p for p in json.loads(bad.stdout)["problems"])
    missing = _cli(tmp_path / "nope")
    assert missing.returncode == 2 and "error:" in missing.stderr and "not a directory" in missing.stderr


# -- inspect's expectations are the plugin's ---------------------------------------------
def _ms(label, group_size=0):
    return {"model_quant_type": label, "version": "1.0.0", "group_size": group_size, f"{W8}.weight": label}


LAYER_CONFIGS = {
    "w8a8 dynamic": lambda lh: lh.ct_config(*lh.W8A8_DYNAMIC),
    "w8a8 static asym": lambda lh: lh.ct_config(*lh.w8a8_static(False)),
    "w8a8 static per-tensor": lambda lh: lh.ct_config(*lh.w8a8_static(True, "tensor")),
    "w4a16 g32 asym act-order": lambda lh: lh.ct_config(lh.wna16(4, 32, False, "group")),
    "w8a16 channel": lambda lh: lh.ct_config(lh.wna16(8, None, True)),
    "w4a8 g32 packed": lambda lh: lh.ct_config(*lh.w4a8(32), fmt="pack-quantized"),
    "w4a8 channel int": lambda lh: lh.ct_config(*lh.w4a8(None), fmt="int-quantized"),
    "msModelSlim W8A8": lambda lh: _ms("W8A8"),
    "msModelSlim W8A8_DYNAMIC": lambda lh: _ms("W8A8_DYNAMIC"),
    "msModelSlim W4A16 g32": lambda lh: _ms("W4A16", 32),
    "msModelSlim W4A16 channel": lambda lh: _ms("W4A16"),
}


@pytest.mark.parametrize("case", LAYER_CONFIGS)
def test_checkpoint_tensors_match_what_the_plugin_registers(vllm_dist, case):
    """Every tensor a scheme's create_weights registers is in its checkpoint_tensors, same shape."""
    from tests import layer_helpers
    layer = layer_helpers.build_layer(
        "ReplicatedLinear", LAYER_CONFIGS[case](layer_helpers), 256, 64, torch.bfloat16, bias=False
    )
    specs = layer.scheme.checkpoint_tensors(64, 256)
    registered = {n: tuple(p.shape) for n, p in layer.named_parameters() if n != "azp_adj"}
    assert set(registered) == set(specs), case
    for name, shape in registered.items():
        assert shape in specs[name].shapes, (case, name, shape, specs[name].shapes)
    # required = what the plugin's require_loaded insists on at load time
    assert {n for n, s in specs.items() if s.required} == set(layer.scheme.tensor_names), case
