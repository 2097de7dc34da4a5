"""`quantize` checks its own output: the written checkpoint, loaded back, against the original model on
held-out text. A broken quantization step is refused and leaves nothing behind; --force writes it
with the failure on the card; a good run records the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vllm_ptq_ascend.recipes import self_check as sc
from vllm_ptq_ascend.recipes.calibration import CalibrationSpec

CALIB = CalibrationSpec(num_samples=16, max_seq_length=64)


def card(ckpt: Path) -> dict:
    return json.loads((ckpt / "ptq_ascend_card.json").read_text())


@pytest.fixture
def wrong_smoothquant_fold(monkeypatch):
    """A broken fold: SmoothQuant multiplies the norm in front of the smoothed linears by its scales
    instead of dividing it (the linears' input channels are multiplied, as they should be)."""
    import llmcompressor.modifiers.transform.smoothquant.base as sq

    real = sq.update_offload_parameter
    folded = []

    def wrong(module, name, data):
        if name == "weight" and data.ndim == 1:  # the norm: data is weight / scales
            folded.append(module)
            data = module.weight * (module.weight / data)
        real(module, name, data)

    monkeypatch.setattr(sq, "update_offload_parameter", wrong)
    return folded


@pytest.fixture
def negated_written_scales(monkeypatch):
    """A broken save: the weight scales in the written safetensors are negated. The model in memory is
    intact, so only a check of what was written can see it."""
    from safetensors.torch import load_file, save_file

    from vllm_ptq_ascend.recipes import quantize as qmod

    real = qmod.make_recipe_file_plain  # runs right after the checkpoint is saved
    corrupted = []

    def corrupt_after_save(path):
        real(path)
        st = Path(path).parent / "model.safetensors"
        tensors = load_file(st)
        names = [n for n in tensors if n.endswith(".weight_scale")]
        save_file({**tensors, **{n: -tensors[n] for n in names}}, st, metadata={"format": "pt"})
        corrupted.extend(names)

    monkeypatch.setattr(qmod, "make_recipe_file_plain", corrupt_after_save)
    return corrupted


def test_good_run_records_the_numbers(make_ckpt, tiny_model):
    """The numbers on the card are those of the written checkpoint on the held-out texts: recomputed
    here with the sensitivity scan's own measurement (a separate implementation)."""
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.recipes.sensitivity import measure, reference

    ckpt = make_ckpt("w8a8-dynamic")
    check = card(ckpt)["self_check"]
    assert check["passed"] and not check["forced"] and check["problems"] == []
    assert check["limits"] == {"max_kl": 1.0, "max_ppl_ratio": 10.0}
    assert 0 < check["kl"] < 0.05  # really quantized, and mildly
    assert check["ppl_original"] > 1 and 0.9 < check["ppl_ratio"] < 1.1
    ids = sc.held_out_samples(AutoTokenizer.from_pretrained(tiny_model))
    assert check["tokens"] == sum(len(s) - 1 for s in ids) and len(ids) == sc.SAMPLES
    ref = reference(sc.load_source(tiny_model), ids, keep_blocks=False)
    damage = measure(sc.load_written(ckpt), ref)
    assert math.isclose(check["kl"], damage.kl, rel_tol=1e-4)
    assert math.isclose(check["ppl_original"], ref.perplexity, rel_tol=1e-6)
    assert math.isclose(check["ppl_ratio"], 1 + damage.ppl_change_pct / 100, rel_tol=1e-6)
    readme = (ckpt / "README.md").read_text()
    assert "- self-check: passed;" in readme and f"mean KL {check['kl']:.4f}" in readme


def test_broken_fold_is_refused_and_leaves_nothing(tiny_model, tmp_path, wrong_smoothquant_fold):
    """The tiny random model's KL saturates near 1.5 nats however badly its blocks are broken (its
    logits lean on the embedding path), so this test sets a limit of 0.25: the correct fold measures
    about 0.002 here, the wrong one about 1.2."""
    from vllm_ptq_ascend.recipes.quantize import quantize

    with pytest.raises(sc.SelfCheckFailed) as err:
        quantize(
            tiny_model, tmp_path / "out", "w8a8-smoothquant", calibration=CALIB, max_kl=0.25, progress=False
        )
    assert len(wrong_smoothquant_fold) == 4  # the broken step ran, on both norms of both blocks
    result = err.value.result
    assert not result["passed"] and result["kl"] > 0.5
    message = str(err.value)
    assert f"mean KL {result['kl']:.4g} nats per token (limit 0.25)" in message
    assert "nothing was written" in message and "--force" in message
    assert list(tmp_path.iterdir()) == []  # no out/, no hidden partial directory


def test_corrupted_written_weights_are_refused_at_the_default_limits(
    tiny_model, tmp_path, negated_written_scales
):
    from vllm_ptq_ascend.recipes.quantize import quantize

    with pytest.raises(
        sc.SelfCheckFailed, match=r"self-check failed: .* mean KL [0-9.]+ nats per token \(limit 1\)"
    ):
        quantize(tiny_model, tmp_path / "out", "w8a8-dynamic")
    assert len(negated_written_scales) == 14  # 7 linears in each of 2 blocks
    assert list(tmp_path.iterdir()) == []


def test_force_writes_the_checkpoint_with_the_failure_recorded(tiny_model, tmp_path, negated_written_scales):
    from vllm_ptq_ascend.recipes.quantize import quantize

    out = quantize(tiny_model, tmp_path / "out", "w8a8-dynamic", force=True)
    check = card(out)["self_check"]
    assert not check["passed"] and check["forced"] and check["kl"] > 1.0
    assert any("mean KL" in p for p in check["problems"])
    assert "- self-check: FAILED (written anyway with --force)" in (out / "README.md").read_text()
    assert list(out.glob("*.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_skipped_self_check_is_recorded(tiny_model, tmp_path, monkeypatch):
    from vllm_ptq_ascend.recipes import quantize as qmod

    def no_check(*args, **kwargs):
        raise AssertionError("the self-check ran")

    monkeypatch.setattr(sc, "self_check", no_check)
    out = qmod.quantize(tiny_model, tmp_path / "out", "w8a8-dynamic", self_check=False)
    assert card(out)["self_check"] == {"skipped": True}
    assert "- self-check: skipped (--no-self-check)" in (out / "README.md").read_text()


def test_limits_per_preset_and_overrides():
    assert sc.limits_for("w8a8-dynamic") == sc.Limits(1.0, 10.0) == sc.DEFAULT_LIMITS
    assert sc.limits_for("w4a4-rtn") == sc.PRESET_LIMITS["w4a4-rtn"] != sc.DEFAULT_LIMITS
    assert sc.limits_for("w4a4-rtn", max_kl=0.5) == sc.Limits(0.5, sc.PRESET_LIMITS["w4a4-rtn"].max_ppl_ratio)
    assert sc.limits_for("w8a8-dynamic", max_ppl_ratio=2) == sc.Limits(1.0, 2.0)
    for bad in ({"max_kl": 0}, {"max_kl": float("nan")}, {"max_ppl_ratio": 0.5}, {"max_kl": float("inf")}):
        with pytest.raises(ValueError, match="self-check limit"):
            sc.limits_for("w8a8-dynamic", **bad)


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"kl": 0.2, "ppl_quantized": 12.0, "ppl_original": 6.0, "ppl_ratio": 2.0}, []),
        ({"kl": 1.5, "ppl_quantized": 12.0, "ppl_original": 6.0, "ppl_ratio": 2.0}, ["mean KL 1.5"]),
        ({"kl": 0.2, "ppl_quantized": 66.0, "ppl_original": 6.0, "ppl_ratio": 11.0}, ["perplexity 66 vs 6"]),
        (
            {"kl": float("nan"), "ppl_quantized": math.nan, "ppl_original": 6.0, "ppl_ratio": math.nan},
            ["KL", "x"],
        ),
    ],
)
def test_judge_names_what_is_out_of_bounds(values, expected):
    problems = sc.judge(values, sc.DEFAULT_LIMITS)
    assert len(problems) == len(expected)
    for problem, text in zip(problems, expected):
        assert text in problem


def test_limits_are_refused_before_any_work_without_the_check(tiny_model, tmp_path):
    from vllm_ptq_ascend.recipes.quantize import quantize

    with pytest.raises(ValueError, match="apply only with the self-check"):
        quantize(tiny_model, tmp_path / "out", "w8a8-dynamic", self_check=False, force=True)
    with pytest.raises(ValueError, match="self-check limit max_kl"):
        quantize(tiny_model, tmp_path / "out", "w8a8-dynamic", max_kl=-1)
    assert list(tmp_path.iterdir()) == []
