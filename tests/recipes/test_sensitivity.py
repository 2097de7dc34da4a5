"""Sensitivity scan and mixed precision under a budget, on the tiny model with one layer made fragile.

The fragile layer: eight channels of block 1's post-attention norm are scaled up 1000x and the
matching input columns of gate/up scaled down 1000x. The float model computes the same function,
but those channels become activation outliers at gate/up's input, so per-token int8 activations
(and the weights' groups) lose the other channels: the outlier pattern SmoothQuant and FlatQuant
exist for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vllm_ptq_ascend.cli import main as cli_main
from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
from vllm_ptq_ascend.recipes.mixed import Budget, apply_fallback
from vllm_ptq_ascend.recipes.presets import build_recipe
from vllm_ptq_ascend.recipes.scan_run import preset_quant_args
from vllm_ptq_ascend.recipes.sensitivity import fake_quantized, quant_units

FRAGILE_UNIT = "model.layers.1.mlp.gate_up_proj"
SCAN = CalibrationSpec(num_samples=4, max_seq_length=64)
CALIB = CalibrationSpec(num_samples=8, max_seq_length=64)


@pytest.fixture(scope="module")
def fragile_model(tiny_model, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("fragile") / "fragile-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    block = model.model.layers[1]
    with torch.no_grad():
        block.post_attention_layernorm.weight[:8] *= 1000
        for proj in (block.mlp.gate_proj, block.mlp.up_proj):
            proj.weight[:, :8] /= 1000
    model.save_pretrained(out)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tiny_fp32(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_units_follow_vllm_fusing(tiny_fp32):
    units = quant_units(tiny_fp32)
    names = [u.name for u in units]
    assert names[:4] == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.mlp.down_proj",
    ]
    assert units[0].layers == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert len(units) == 4 * tiny_fp32.config.num_hidden_layers and all("lm_head" not in n for n in names)
    blocks = quant_units(tiny_fp32, granularity="block")
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.1"] and len(blocks[0].layers) == 7
    with pytest.raises(ValueError, match="granularity"):
        quant_units(tiny_fp32, granularity="layer")


def test_fake_quantization_is_on_the_grid_and_undone(tiny_fp32):
    args = preset_quant_args("w4a8", group_size=32)
    layer = tiny_fp32.model.layers[0].mlp.down_proj
    before = layer.weight.detach().clone()
    seen = {}
    with fake_quantized(tiny_fp32, {"model.layers.0.mlp.down_proj": args}):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1, 32)
        assert not torch.equal(layer.weight, before)
        # int4: every group of 32 input channels holds at most 16 distinct levels
        assert max(len(torch.unique(g)) for g in w.reshape(-1, 32)) <= 16
        hook = layer.register_forward_hook(lambda _m, inp, _o: seen.update(x=inp[0].detach()))
        tiny_fp32(torch.tensor([[5, 6, 7, 8, 9]]))
        hook.remove()
    x = seen["x"].double().reshape(-1, seen["x"].shape[-1])  # activations: int8 per token
    # the largest |value| of a row sits at the grid's end: +127 or -128 steps
    peak = x.gather(1, x.abs().argmax(-1, keepdim=True))
    step = peak.abs() / torch.where(peak > 0, 127.0, 128.0)
    xq = x / step
    assert torch.allclose(xq, xq.round(), atol=1e-3) and len(torch.unique(xq.round())) > 16
    assert torch.equal(layer.weight, before)  # restored bit for bit


@pytest.mark.parametrize(
    "text, metric, value",
    [("kl=0.05", "kl", 0.05), ("KL = 1e-3", "kl", 1e-3), ("ppl=5", "ppl", 5.0), ("ppl=2.5%", "ppl", 2.5)],
)
def test_budget_parses(text, metric, value):
    assert Budget.parse(text) == Budget(metric, value)


@pytest.mark.parametrize("text", ["kl", "kl=", "kl=-1", "mse=0.1", "kl=0.1%", "ppl=nan", "ppl=five", ""])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(text)


def test_fallback_group_targets_the_kept_layers_exactly():
    modifiers = build_recipe("w4a8", group_size=32)
    kept = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    apply_fallback(modifiers, kept, "w8a8")
    groups = modifiers[0].config_groups
    assert groups["fallback"].targets == kept and groups["fallback"].weights.num_bits == 8
    assert groups["fallback"].input_activations.num_bits == 8 and groups["group_0"].targets == ["Linear"]
    modifiers = build_recipe("w4a16-rtn", group_size=32)
    apply_fallback(modifiers, kept, "none")
    assert modifiers[0].ignore == ["lm_head", *kept] and "fallback" not in modifiers[0].config_groups


@pytest.mark.parametrize("preset", ["w4a4-rtn", "w8a8-dynamic", "w4a8"])
def test_fallback_reaches_the_config_the_modifier_applies(preset):
    """QuantizationModifier resolves its config when built: the fallback must reach that resolved
    config, not only config_groups (it once did not, and QuantizationModifier presets ignored it)."""
    kept = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    modifiers = build_recipe(preset)
    _ = modifiers[0].resolved_config  # resolved once already, as llmcompressor does at construction
    apply_fallback(modifiers, kept, "w8a8")
    assert modifiers[0].resolved_config.config_groups["fallback"].targets == kept
    modifiers = build_recipe(preset)
    _ = modifiers[0].resolved_config
    apply_fallback(modifiers, kept, "none")
    assert set(kept) <= set(modifiers[0].resolved_config.ignore)


def test_scan_ranks_the_fragile_layer_first(fragile_model, tmp_path, capsys):
    out = tmp_path / "scan"
    code = cli_main(["sensitivity", str(fragile_model), "--scheme", "w4a8", "--group-size", "32", "--out",
                     str(out), "--scan-samples", "4", "--scan-seq-len", "64"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "sensitivity.json").read_text())
    rows = result["rows"]
    assert rows[0]["unit"] == FRAGILE_UNIT and rows[0]["block"] == 1
    assert rows[0]["kl"] > 2 * rows[1]["kl"]  # by a wide margin
    assert rows[0]["mse"] > max(r["mse"] for r in rows[1:])  # its own block's output suffers most too
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(a["kl"] >= b["kl"] for a, b in zip(rows, rows[1:]))
    assert FRAGILE_UNIT in (out / "sensitivity.md").read_text()
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert FRAGILE_UNIT in capsys.readouterr().out


def _mixed(model, out, fraction: float, fallback: str | None) -> tuple[Path, str]:
    """w4a8 under a KL budget of ``fraction`` x the uniform checkpoint's KL on the scan samples."""
    from vllm_ptq_ascend.recipes.quantize import quantize
    from vllm_ptq_ascend.recipes.scan_run import run_scan

    uniform = run_scan(model, "w4a8", {"group_size": 32}, spec=SCAN, progress=False)["uniform"]
    budget = f"kl={uniform['kl'] * fraction:.6f}"
    quantize(model, out, "w4a8", calibration=CALIB, budget=budget, fallback=fallback, scan_calibration=SCAN,
             progress=False, group_size=32)  # fmt: skip
    return out, budget


@pytest.fixture(scope="module")
def mixed_none(fragile_model, tmp_path_factory):
    """The fragile model: its outlier channels defeat int8 activations too, so only float saves it."""
    return _mixed(fragile_model, tmp_path_factory.mktemp("mixed") / "w4a8-none", 0.5, "none")


@pytest.fixture(scope="module")
def mixed_w8a8(tiny_model, tmp_path_factory):
    """The plain tiny model, whose first qkv_proj the int4 grid hurts most: W8A8 is safe enough."""
    return _mixed(tiny_model, tmp_path_factory.mktemp("mixed") / "w4a8-w8a8", 0.6, None)


def _card(ckpt: Path) -> dict:
    return json.loads((ckpt / "ptq_ascend_card.json").read_text())["mixed_precision"]


def test_mixed_checkpoint_meets_the_budget_the_uniform_one_misses(mixed_none):
    out, budget = mixed_none
    card = _card(out)
    assert card["budget"] == budget and card["fallback"] == "none"
    assert card["kept_units"][0] == FRAGILE_UNIT and 1 <= len(card["kept_units"]) < card["units_total"]
    limit = Budget.parse(budget).value
    assert card["uniform"]["kl"] > limit  # the uniform checkpoint misses it
    assert card["selected"]["kl"] <= limit  # the selection meets it on the fake-quantized model
    assert card["checkpoint"]["kl"] <= limit and card["met"]  # and so does the written checkpoint
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(card["kept_layers"]) <= set(config["ignore"])  # kept in float
    assert "mixed precision: budget" in (out / "README.md").read_text()


def test_mixed_checkpoint_with_a_w8a8_fallback_group(mixed_w8a8):
    out, budget = mixed_w8a8
    card = _card(out)
    assert card["fallback"] == "w8a8"  # the default: the preset quantizes activations
    assert card["kept_units"] and card["met"] and card["uniform"]["kl"] > Budget.parse(budget).value
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    fallback = [g for g in config["config_groups"].values() if g["targets"] != ["Linear"]]
    assert fallback[0]["targets"] == card["kept_layers"]
    assert fallback[0]["weights"]["num_bits"] == 8 and fallback[0]["format"] == "int-quantized"
    assert config["format"] == "mixed-precision"  # int-quantized W8A8 beside pack-quantized W4A8


@pytest.mark.engine
def test_mixed_checkpoints_served_by_plugin_match_fake_quant(mixed_none, mixed_w8a8, fragile_model):
    from transformers import AutoTokenizer

    from tests.engine_runner import run_engines
    from tests.recipes.test_presets_e2e import diffs, llmcompressor_fake_quant_logprobs
    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(fragile_model)
    prompts = [tok(t)["input_ids"][:48] for t in reasoning_texts()[-3:]]
    ckpts = [mixed_none[0], mixed_w8a8[0]]
    jobs = [{"model": str(c), "quantization": None, "dtype": "float32", "prompts": prompts} for c in ckpts]
    for ckpt, res in zip(ckpts, run_engines(jobs)):
        assert "error" not in res, res
        assert res["quantization_used"] == "ptq_ascend"  # detected with no flag
        d = diffs(res["prompt_logprobs"], llmcompressor_fake_quant_logprobs(ckpt, prompts))
        # activation-quantized tolerances of tests/recipes/test_presets_e2e.py (grid 127 vs 127.5)
        assert sum(d) / len(d) < 0.1 and max(d) < 0.5, ckpt


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "kl=-1"], "budget"),
        (["--fallback", "w8a8"], "apply only with --budget"),
        (["--scan-samples", "4"], "apply only with --budget"),
        (["--budget", "kl=0", "--fallback", "w8a8"], "cannot be met"),
    ],
)
def test_quantize_budget_errors(fragile_model, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = ["quantize", str(fragile_model), "--recipe", "w4a16-rtn", "--group-size", "32", "--out", str(out)]
    scan = ["--scan-samples", "2", "--scan-seq-len", "32"] if "--budget" in args else []
    code = cli_main(base + scan + args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_sensitivity_bad_arguments(tiny_model, tmp_path, capsys):
    assert cli_main(["sensitivity", str(tiny_model), "--scheme", "w9a9", "--out", str(tmp_path)]) == 2
    assert "w9a9" in capsys.readouterr().err
    assert cli_main(["sensitivity", str(tiny_model), "--scheme", "w8a8-dynamic", "--group-size", "32",
                     "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "takes no --group-size" in capsys.readouterr().err


def test_a_saved_scan_is_reused_only_for_its_own_model_and_grid(fragile_model, tiny_model, tmp_path, capsys):
    from vllm_ptq_ascend.recipes.mixed import load_ranking
    from vllm_ptq_ascend.recipes.scan_run import run_scan, write_scan

    result = run_scan(fragile_model, "w4a8", {"group_size": 32}, spec=SCAN, progress=False)
    write_scan(result, tmp_path / "scan")
    path = tmp_path / "scan" / "sensitivity.json"
    from transformers import AutoModelForCausalLM

    units = quant_units(AutoModelForCausalLM.from_pretrained(fragile_model))
    rows = load_ranking(path, fragile_model, "w4a8", {"group_size": 32, "actorder": None}, units)
    assert rows[0]["unit"] == FRAGILE_UNIT  # actorder does not change the grid
    with pytest.raises(ValueError, match="scanned"):
        load_ranking(path, fragile_model, "w4a8", {"group_size": 64}, units)  # another grid
    with pytest.raises(ValueError, match="scanned"):
        load_ranking(path, tiny_model, "w4a8", {"group_size": 32}, units)  # another model
    out = tmp_path / "out"
    args = ["quantize", str(fragile_model), "--recipe", "w4a16-rtn", "--group-size", "32", "--out", str(out)]
    assert cli_main([*args, "--budget", "kl=1", "--scan", str(path)]) == 2  # a w4a8 scan for a w4a16 preset
    assert "scanned" in capsys.readouterr().err and not out.exists()


def test_a_resolved_gptq_config_scans_the_same_grid():
    """llmcompressor writes actorder and the observer into the args once it resolves a GPTQ config;
    neither enters the scan, so a saved scan must still match (this failed in the full suite)."""
    from compressed_tensors.quantization import QuantizationArgs

    from vllm_ptq_ascend.recipes.sensitivity import QuantArgs

    (fresh,) = build_recipe("w4a8", group_size=32, actorder=None)
    (resolved,) = build_recipe("w4a8", group_size=32)
    resolved.resolve_quantization_config()
    assert next(iter(resolved.config_groups.values())).weights.actorder == "static"  # really resolved
    dump = [next(iter(m.config_groups.values())).model_dump(exclude_none=True) for m in (fresh, resolved)]
    assert QuantArgs.from_group(dump[0]).grid() == QuantArgs.from_group(dump[1]).grid()
    grid = QuantizationArgs(num_bits=4, symmetric=True, group_size=32, strategy="group")
    assert QuantArgs.from_group(dump[1]).grid()[0] == grid.model_dump(mode="json")
    other = {**dump[1], "weights": {**dump[1]["weights"], "group_size": 64}}
    assert QuantArgs.from_group(other).grid() != QuantArgs.from_group(dump[1]).grid()  # the grid still counts


def test_budget_with_online_rotations_measures_the_checkpoint_with_them(tiny_model, tmp_path):
    """w4a8-quip under a budget: the written checkpoint is measured with its online rotations
    attached (as served), so its KL is the self-check's order, not that of rotated weights run
    without their online half; the card says the scan ranked layers without the rotations."""
    from vllm_ptq_ascend.recipes.quantize import quantize

    out = quantize(tiny_model, tmp_path / "quip", "w4a8-quip", calibration=CALIB, budget="kl=5",
                   scan_calibration=SCAN, progress=False, group_size=32)  # fmt: skip
    card = json.loads((out / "ptq_ascend_card.json").read_text())
    mixed = card["mixed_precision"]
    assert mixed["met"] and mixed["checkpoint"]["kl"] < 0.5, mixed["checkpoint"]
    assert "without the preset's rotations" in mixed["scan_note"]


def test_budget_with_a_mixed_layout_preset_is_refused(tiny_model, tmp_path):
    from vllm_ptq_ascend.recipes.quantize import quantize

    with pytest.raises(ValueError, match="w4a4-mixed.*already mixes.*2 config groups"):
        quantize(tiny_model, tmp_path / "o", "w4a4-mixed", calibration=CALIB, budget="kl=1", progress=False)
    assert not (tmp_path / "o").exists()
