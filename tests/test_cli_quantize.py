"""The quantize command: clear errors for bad arguments, atomic output, a marked checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "vllm_ptq_ascend.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


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
