"""Preset recipes: builders and shipped YAML agree, knobs are checked, llmcompressor workarounds hold.

No vLLM engine here (tests/recipes/test_presets_e2e.py serves the presets' checkpoints).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
from vllm_ptq_ascend.recipes.presets import PRESETS, build_recipe, preset_yaml, yaml_path
from vllm_ptq_ascend.recipes.quantize import (
    check_recipe_fits_model,
    cpu_without_pinned_memory,
    quantize,
    single_process_calibration,
)

SMALL_CALIB = CalibrationSpec(num_samples=8, max_seq_length=64)
EXPECTED_PRESETS = {
    "w8a8-dynamic",
    "w8a8-smoothquant",
    "w4a16-awq",
    "w4a16-gptq",
    "w8a16-gptq",
    "w4a8",
    "w4a16-rtn",
    "w4a4-rtn",
    "w4a16-spinquant",
    "w4a8-spinquant",
    "w4a4-spinquant",
    "w4a8-quip",
    "w4a4-quip",
    "w4a4-mixed",
    "w4a16-autoround",
    "w4a4-flatquant",
    "w4a8-flatquant",
    "w8a8-flatquant",
}


def test_every_preset_is_registered_and_shipped_as_yaml():
    assert set(PRESETS) == EXPECTED_PRESETS
    for name in PRESETS:
        # The shipped YAML is what the builder makes with its defaults (regenerate with
        # `python -m vllm_ptq_ascend.recipes.presets` after changing a builder).
        assert yaml_path(name).read_text() == preset_yaml(name), f"{yaml_path(name)} is stale"
        assert "!!python" not in yaml_path(name).read_text()


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_shipped_yaml_loads_in_llmcompressor(name):
    from llmcompressor.recipe import Recipe

    loaded = Recipe.create_instance(str(yaml_path(name)))
    assert [type(m).__name__ for m in loaded.modifiers] == [type(m).__name__ for m in build_recipe(name)]


def test_flatquant_yaml_loads_in_a_fresh_process():
    """FlatQuantModifier is ours: llmcompressor finds it once vllm_ptq_ascend.recipes.flatquant is loaded."""
    import subprocess
    import sys

    code = (
        "import vllm_ptq_ascend.recipes.flatquant\n"
        "from llmcompressor.recipe import Recipe\n"
        f"r = Recipe.create_instance({str(yaml_path('w4a4-flatquant'))!r})\n"
        "print([type(m).__name__ for m in r.modifiers], r.modifiers[0].act_bits)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['FlatQuantModifier', 'GPTQModifier'] 4" in out.stdout  # GPTQ weights: the W4A4 default


def test_yaml_recipe_and_builder_write_the_same_checkpoint(tiny_model, tmp_path):
    """`oneshot(recipe=shipped YAML)` is the preset: same tensors as the Python builder."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptq_ascend.recipes.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data, _ = build_calibration(tiny_model, tok, SMALL_CALIB, cache_dir=tmp_path / "cache")
    tensors = []
    for recipe in (str(yaml_path("w4a16-gptq")), build_recipe("w4a16-gptq")):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
        oneshot(
            model=model,
            recipe=recipe,
            dataset=data,
            num_calibration_samples=len(data),
            max_seq_length=64,
            shuffle_calibration_samples=False,  # GPTQ's sums depend on the sample order
        )
        out = tmp_path / f"ckpt{len(tensors)}"
        model.save_pretrained(out, save_compressed=True)
        tensors.append(load_file(out / "model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys()
    assert any(k.endswith("weight_packed") for k in tensors[0])
    for k in tensors[0]:
        assert torch.equal(tensors[0][k], tensors[1][k]), k


def test_knobs_reach_the_config_groups():
    (gptq,) = build_recipe("w4a8", group_size=None, actorder=None, ignore=["lm_head", "re:.*down_proj"])
    group = gptq.config_groups["group_0"]
    assert group.weights.strategy == "channel" and group.weights.num_bits == 4
    assert group.input_activations.dynamic is True and group.format == "pack-quantized"
    assert gptq.actorder is None and gptq.ignore == ["lm_head", "re:.*down_proj"]
    sq, gptq = build_recipe("w8a8-smoothquant", activations="dynamic", smoothing_strength=0.5)
    assert sq.smoothing_strength == 0.5
    assert gptq.config_groups["group_0"].input_activations.strategy == "token"
    (qm,) = build_recipe("w4a16-rtn", group_size=32)
    assert qm.config_groups["group_0"].weights.group_size == 32
    (ar,) = build_recipe("w4a16-autoround", iters=50, lr=5e-3)  # auto-round's "light" recipe
    assert (ar.iters, ar.lr) == (50, 5e-3)
    assert build_recipe("w4a16-autoround")[0].lr is None  # auto-round's own 1 / iters


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("w8a8-dynamic", {"group_size": 64}, "takes no option 'group_size' (its options: ignore)"),
        ("w4a16-gptq", {"group_size": 0}, "group_size must be a positive integer"),
        ("w4a16-gptq", {"group_size": "64"}, "group_size must be a positive integer"),
        ("w4a16-gptq", {"actorder": "group"}, "actorder must be one of"),
        ("w8a8-smoothquant", {"activations": "per-token"}, "activations must be 'dynamic' or 'static'"),
        ("w8a8-smoothquant", {"smoothing_strength": 1.5}, "smoothing_strength must lie in [0, 1]"),
        ("w9a9", {}, "unknown recipe 'w9a9'; available: w4a16-autoround, w4a16-awq"),
    ],
)
def test_bad_options_are_rejected(name, options, message):
    with pytest.raises(ValueError) as e:
        build_recipe(name, **options)
    assert message in str(e.value)


def test_group_size_must_divide_every_layer(tiny_model):
    # tiny Llama: hidden 256 (q/k/v/o, gate/up inputs), intermediate 512 (down_proj input)
    with pytest.raises(ValueError) as e:
        check_recipe_fits_model(tiny_model, build_recipe("w4a16-gptq", group_size=96))
    msg = str(e.value)
    assert (
        "group size 96 does not divide" in msg and "model.layers.0.self_attn.q_proj (input size 256)" in msg
    )
    assert "and 11 more" in msg  # 2 blocks x 7 projections, all named or counted
    check_recipe_fits_model(tiny_model, build_recipe("w4a16-gptq", group_size=128))
    # the layers a group size cannot serve can be ignored instead
    check_recipe_fits_model(
        tiny_model, build_recipe("w4a16-gptq", group_size=96, ignore=["lm_head", "re:.*proj"])
    )


def test_ignore_entry_that_matches_nothing_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="ignore entry 'lm_haed' matches no layer"):
        check_recipe_fits_model(tiny_model, build_recipe("w4a16-gptq", ignore=["lm_haed"]))


def test_rtn_preset_refuses_calibration(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="uses no calibration data"):
        quantize(tiny_model, tmp_path / "o", "w8a8-dynamic", calibration=SMALL_CALIB)
    assert not (tmp_path / "o").exists()


def test_awq_needs_the_pinned_memory_workaround_on_cpu(tiny_model, tmp_path):
    """llmcompressor 0.14's AWQ pins memory and crashes without an accelerator; our context
    manager skips pinning. If the first half stops failing, the workaround can go."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptq_ascend.recipes.calibration import build_calibration

    assert not torch.accelerator.is_available()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    data, _ = build_calibration(tiny_model, tok, CalibrationSpec(num_samples=4, max_seq_length=32), tmp_path)
    kw = dict(dataset=data, num_calibration_samples=4, max_seq_length=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    with single_process_calibration(), pytest.raises(RuntimeError, match="accelerator"):
        oneshot(model=model, recipe=build_recipe("w4a16-awq"), **kw)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    with single_process_calibration(), cpu_without_pinned_memory():
        oneshot(model=model, recipe=build_recipe("w4a16-awq"), **kw)
    from llmcompressor.pipelines.cache import IntermediatesCache

    assert IntermediatesCache.pin_memory.__name__ == "pin_memory"  # restored afterwards


def test_awq_in_a_process_that_holds_a_process_group(vllm_dist, tiny_model, tmp_path):
    """A vLLM engine started in-process leaves a torch.distributed group behind (vllm_dist sets one
    up the same way); llmcompressor must still calibrate as one process."""
    import torch.distributed as dist

    assert dist.is_initialized()
    out = quantize(
        tiny_model,
        tmp_path / "awq",
        "w4a16-awq",
        calibration=CalibrationSpec(num_samples=4, max_seq_length=32),
    )
    assert (out / "model.safetensors").is_file()


def test_saved_recipe_yaml_reloads(preset_ckpts):
    """SmoothQuant mappings (tuples) and GPTQ act-order (an enum) are written as python tags
    by llmcompressor; the recipe.yaml we leave in a checkpoint is plain and reloads."""
    from llmcompressor.recipe import Recipe

    for name in ("w8a8-smoothquant", "w4a16-gptq", "w4a16-awq"):
        path = preset_ckpts[name] / "recipe.yaml"
        assert "!!python" not in path.read_text()
        assert Recipe.create_instance(str(path)).modifiers


def test_model_card(preset_ckpts):
    ckpt = preset_ckpts["w4a8"]
    card = json.loads((ckpt / "ptq_ascend_card.json").read_text())
    assert card["recipe"] == "w4a8" and card["calibration"]["num_samples"] == 16
    assert card["libraries"]["llmcompressor"] == "0.14.0.1" and card["seconds"] > 0
    readme = (ckpt / "README.md").read_text()
    assert "w4a8" in readme and "16 samples" in readme
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["ptq_ascend"]["recipe"] == "w4a8"


def test_same_seed_same_checkpoint(tiny_model, tmp_path):
    spec = CalibrationSpec(num_samples=8, max_seq_length=48, seed=3)
    a = quantize(tiny_model, tmp_path / "a", "w4a16-gptq", calibration=spec)
    b = quantize(tiny_model, tmp_path / "b", "w4a16-gptq", calibration=spec)
    other = CalibrationSpec(num_samples=8, max_seq_length=48, seed=4)
    c = quantize(tiny_model, tmp_path / "c", "w4a16-gptq", calibration=other)
    ta, tb, tc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)  # other samples, other GPTQ result


def test_w4a8_checkpoint_is_packed(preset_ckpts):
    """llmcompressor saves W4A8 as int8 (one int4 value per byte) unless asked to pack: we ask."""
    sd = load_file(preset_ckpts["w4a8"] / "model.safetensors")
    packed = sd["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (256, 512 // 8)
    assert not any(k.endswith("proj.weight") for k in sd)


@pytest.mark.parametrize("keep", [(), (1, 12)])
def test_mixed_w4a4_puts_each_linear_in_exactly_one_group(keep):
    """msModelSlim's layout: attention and down_proj W8A8, gate/up W4A4 except the kept layers'."""
    from compressed_tensors.utils.match import match_name

    _, gptq = build_recipe("w4a4-mixed", w8a8_mlp_layers=keep)
    groups = {name: (g.targets, g.input_activations.num_bits) for name, g in gptq.config_groups.items()}
    for layer in (0, 1, 2, 11, 12, 21):
        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{proj}"
            bits = [b for targets, b in groups.values() if any(match_name(name, t) for t in targets)]
            w4a4 = proj in ("mlp.gate_proj", "mlp.up_proj") and layer not in keep
            assert bits == [4 if w4a4 else 8], (name, bits)
    with pytest.raises(ValueError, match="layer indices"):
        build_recipe("w4a4-mixed", w8a8_mlp_layers=(-1,))
