"""Shared fixtures: vLLM environment, a single-rank vLLM process group, a tiny model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_PTQ_ASCEND_CACHE", str(REPO / ".cache"))
# child processes (engine runners, the CLI, `vllm serve`) import this checkout's package, not the one
# the editable install points at: from a git worktree they would otherwise test another tree
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
from vllm_ptq_ascend.env import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_dist():
    """A one-process vLLM tensor-parallel group, so vLLM layers can be built directly."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vllm_ptq_ascend.assets.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


# the calibration of make_ckpt's KV-cache checkpoints (tests/recipes/test_kv_cache.py recomputes it)
KV_CALIBRATION = dict(num_samples=8, max_seq_length=64)


@pytest.fixture(scope="session")
def make_ckpt(tiny_model, tmp_path_factory):
    """Build (once per session) the tiny model's checkpoint for a scheme name from tests/checkpoints.py."""
    from tests.checkpoints import LLMCOMPRESSOR_SCHEMES, act_order_checkpoint, llmcompressor_checkpoint
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
    from vllm_ptq_ascend.recipes.quantize import quantize

    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            if name in LLMCOMPRESSOR_SCHEMES:
                cache[name] = llmcompressor_checkpoint(tiny_model, root / name, name)
            elif name == "w8a8-dynamic":
                cache[name] = quantize(tiny_model, root / name, "w8a8-dynamic")
            elif name.startswith("w8a8-dynamic-kv-"):  # + a calibrated fp8 or int8 KV cache
                kv = name.removeprefix("w8a8-dynamic-kv-")
                cache[name] = quantize(
                    tiny_model,
                    root / name,
                    "w8a8-dynamic",
                    kv_cache=kv,
                    calibration=CalibrationSpec(**KV_CALIBRATION),
                    calibration_dtype="float32",
                    progress=False,
                )
            elif name == "w4a16-g32-actorder":
                cache[name] = act_order_checkpoint(tiny_model, root / name)
            else:
                raise KeyError(name)
        return cache[name]

    return make


PRESET_CALIBRATION = dict(num_samples=16, max_seq_length=64)


# checkpoint name -> (preset, options): every preset with its defaults, and the non-default
# activation kind of SmoothQuant
PRESET_VARIANTS = {
    "w8a8-smoothquant-static": ("w8a8-smoothquant", {"activations": "static"}),
    # round-to-nearest weights (w4a8-flatquant's default is GPTQ on the transformed inputs); 2 epochs:
    # the wiring is tested here, the training by the presets
    "w4a8-flatquant-rtn": ("w4a8-flatquant", {"weights": "rtn", "epochs": 2}),
}
# fewer tuning steps where the default takes minutes on the tiny model (the default's recipe is
# checked by tests/recipes/test_recipes.py's YAML test)
PRESET_TEST_OPTIONS = {"w4a16-autoround": {"iters": 5}}


@pytest.fixture(scope="session")
def preset_ckpts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Every preset recipe run by `quantize()` on the tiny model (shipped calibration text)."""
    from vllm_ptq_ascend.recipes.calibration import CalibrationSpec
    from vllm_ptq_ascend.recipes.presets import PRESETS
    from vllm_ptq_ascend.recipes.quantize import quantize

    root = tmp_path_factory.mktemp("presets")
    calib = CalibrationSpec(**PRESET_CALIBRATION)
    out = {}
    runs = {n: (n, PRESET_TEST_OPTIONS.get(n, {})) for n in PRESETS} | PRESET_VARIANTS
    for name, (preset, options) in runs.items():
        needs = PRESETS[preset].needs_calibration
        out[name] = quantize(tiny_model, root / name, preset, calibration=calib if needs else None, **options)
    return out
