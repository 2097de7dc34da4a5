"""The dtype a model is calibrated in, and the bf16 checkpoint written from it.

Where calibration runs on a CPU without native bf16 arithmetic (no AVX512_BF16 or AMX on x86, no BF16
extension on Arm), torch's bf16 GEMM is emulated: on the AVX2-only EPYC of our CI a 512x576 @
576x1536 product takes 822 ms in bf16 against 23 ms in float32. There the model is calibrated in
float32. The checkpoint is written in bf16 either way: floating-point tensors are cast after
compression, so the integer weights are those computed against the float32 scales (casting the model
before compression would round q·s and s separately and could move an int8 value by one).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_ptq_ascend.cpu_features import native_bf16

CHOICES = ("auto", "float32", "bfloat16")
CHECKPOINT_DTYPE = torch.bfloat16


def bf16_is_native() -> bool:
    """bf16 arithmetic runs in hardware here: an accelerator, or a CPU with native bf16."""
    return torch.accelerator.is_available() or native_bf16()


def calibration_dtype(choice: str = "auto") -> torch.dtype:
    """``auto``: bf16 where ``bf16_is_native``, float32 elsewhere."""
    if choice not in CHOICES:
        raise ValueError(f"calibration dtype must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice != "auto":
        return getattr(torch, choice)
    return torch.bfloat16 if bf16_is_native() else torch.float32


def transform_tensor_names(model) -> set[str]:
    """The parameters of the model's transform modules (FlatQuant's factors and clipping ratio). They
    are kept in the transform's own precision (float32), as a bf16 run writes them too."""
    from compressed_tensors.transform import TransformBase

    return {
        f"{name}.{p}"
        for name, module in model.named_modules()
        if isinstance(module, TransformBase)
        for p, _ in module.named_parameters(recurse=False)
    }


def cast_checkpoint(
    ckpt_dir: Path, dtype: torch.dtype = CHECKPOINT_DTYPE, keep: set[str] | frozenset[str] = frozenset()
) -> None:
    """Cast every floating-point tensor of the checkpoint's safetensors files to ``dtype``, except those
    named in ``keep`` (integer weights, zero points and packed values are left alone too), and record
    ``dtype`` in config.json."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = str(dtype).removeprefix("torch.")
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors written")
    total = 0
    for path in files:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        cast = {k for k, t in tensors.items() if t.is_floating_point() and t.dtype != dtype and k not in keep}
        if cast:
            tensors = {k: t.to(dtype) if k in cast else t for k, t in tensors.items()}
            save_file(tensors, path, metadata=metadata)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2) + "\n")
    cfg_path = ckpt_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    if not any(key in cfg for key in ("dtype", "torch_dtype")):
        cfg["torch_dtype"] = name
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
