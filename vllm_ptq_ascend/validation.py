"""Checks on checkpoint tensors as vLLM loads them, with errors that name file, layer and tensor.

vLLM's own loaders cast a tensor of the wrong dtype silently and fail on a wrong
shape with a bare assertion; a missing shard of a fused layer goes unnoticed.
Every parameter our schemes create is loaded through :func:`checked_loader`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint does not match what its quantization config promises."""


@dataclass(frozen=True)
class TensorSpec:
    """What a scheme expects of one checkpoint tensor of one (unfused) layer.

    The schemes' ``checkpoint_tensors`` return these; ``inspect`` checks headers against
    them without building the layer. ``shapes``: accepted shapes (None: any);
    ``scale``: values must be finite and > 0 (:func:`require_positive_finite`), or with
    ``signed`` finite and non-zero (:func:`require_nonzero_finite`).
    """

    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...] | None = None
    required: bool = True
    scale: bool = False
    signed: bool = False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_problem(dtype: torch.dtype, allowed: Iterable[torch.dtype]) -> str | None:
    """'dtype X, expected one of: ...' when ``dtype`` is not allowed (the loaders' wording)."""
    allowed = tuple(allowed)
    if dtype in allowed:
        return None
    return f"dtype {dtype_name(dtype)}, expected one of: {', '.join(dtype_name(d) for d in allowed)}"


def tensor_file_index(model_dir: str | Path) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it (headers only, no data read)."""
    root = Path(model_dir)
    index: dict[str, str] = {}
    if not root.is_dir():
        return index
    for f in sorted(root.glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name in header:
            if name != "__metadata__":
                index[name] = f.name
    return index


def where(files: dict[str, str], layer_name: str, tensor: str, shards: Iterable[str] = ()) -> str:
    """'file.safetensors: layer L, tensor T' for error messages.

    A fused vLLM layer (qkv_proj) has no tensors of its own name: the file is found
    through its checkpoint shards (q_proj, k_proj, v_proj), or any tensor of the layer.
    """
    names = [layer_name, *shards]
    file = next((files[f"{n}.{tensor}"] for n in names if f"{n}.{tensor}" in files), None)
    if file is None:
        file = next((f for k, f in files.items() if any(k.startswith(f"{n}.") for n in names)), None)
    prefix = f"{file}: " if file else ""
    return f"{prefix}layer '{layer_name}', tensor '{tensor}'"


def agreed_by_shards(per_shard: dict[str, Any], problem: str, why: str, unset: str = "none") -> Any:
    """The one value every fused shard of a layer has (vLLM runs a fused layer as one), else a
    CheckpointError: ``problem``, each shard's value (``unset`` for None), then ``why``."""
    values = set(per_shard.values())
    if len(values) > 1:
        detail = ", ".join(f"{s} -> {unset if v is None else v}" for s, v in per_shard.items())
        raise CheckpointError(f"{problem} ({detail}); {why}")
    return values.pop()


def same_on_every_shard(where: str, name: str, convert: Callable) -> Callable:
    """A loader for a tensor each fused shard stores a copy of (a transform its shards share): the
    first copy is kept, and every other must equal it."""

    def load(param, loaded_weight, shard_id=None):
        value = convert(loaded_weight.detach())
        if getattr(param, "ptq_loaded_shards", None):
            if param.data.shape != value.shape or not torch.equal(param.data, value):
                raise CheckpointError(
                    f"{where} (shard {shard_id}): differs from the other shards' {name}; "
                    "the layers fused here read one input and need one transform"
                )
            return
        param.data = value.clone()

    return load


def checked_loader(
    inner: Callable,
    *,
    layer_name: str,
    tensor: str,
    dtypes: Iterable[torch.dtype],
    files: dict[str, str],
    shards: Iterable[str] = (),
) -> Callable:
    """Wrap a vLLM weight loader: reject wrong dtypes and shapes, record which shards arrived."""
    allowed = tuple(dtypes)

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs):
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        at = where(files, layer_name, tensor, shards)
        bad_dtype = dtype_problem(loaded_weight.dtype, allowed)
        if bad_dtype:
            raise CheckpointError(f"{at}{'' if shard is None else f' (shard {shard})'}: {bad_dtype}")
        try:
            result = inner(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError, IndexError) as e:
            raise CheckpointError(
                f"{at}{'' if shard is None else f' (shard {shard})'}: shape "
                f"{tuple(loaded_weight.shape)} does not fit the layer's parameter of shape "
                f"{tuple(param.shape)} ({e or 'shape mismatch'})"
            ) from e
        loaded = getattr(param, "ptq_loaded_shards", set())
        loaded.add(shard)
        param.ptq_loaded_shards = loaded
        return result

    return load


def require_loaded(
    layer: torch.nn.Module,
    layer_name: str,
    names: Iterable[str],
    files: dict[str, str],
    shards: list[str],
) -> None:
    """Every checkpoint tensor the scheme needs arrived, for every shard of a fused layer."""
    for name in names:
        owner, _, attr = name.rpartition(".")  # "<submodule>.<tensor>" for transform tensors
        param = getattr(getattr(layer, owner, None) if owner else layer, attr, None)
        if param is None:
            continue
        got = getattr(param, "ptq_loaded_shards", set())
        if got and (None in got or len(got) >= len(shards)):
            continue
        # vLLM names fused shards 'q'/'k'/'v' or 0, 1, ... in checkpoint order
        ids = ["q", "k", "v"] if len(shards) == 3 and {"q", "k", "v"} >= got else range(len(shards))
        missing = [s for i, s in zip(ids, shards) if i not in got] if got else shards
        raise CheckpointError(
            f"{where(files, layer_name, name, shards)}: missing from the checkpoint"
            f" (no '{name}' for {', '.join(missing)})"
        )


def require_int_range(where: str, w: torch.Tensor, num_bits: int, what: str) -> None:
    """Integer weights stored in a wider type (int4 in int8) must hold ``num_bits``-bit values only."""
    lo, hi = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    if w.numel() and (int(w.min()) < lo or int(w.max()) > hi):
        raise CheckpointError(
            f"{where}: values must lie in [{lo}, {hi}] for {what}, found [{int(w.min())}, {int(w.max())}]"
        )


def require_nonzero_finite(
    layer_name: str, name: str, t: torch.Tensor, files: dict[str, str], shards: Iterable[str] = ()
) -> None:
    """Weight scales must be finite and non-zero. Their sign folds into the weights: w = q·s holds
    for either sign, and AutoRound's symmetric grid stores negative scales (max|w| -> -2^(b-1))."""
    _require_scales(layer_name, name, t, files, shards, t.float() == 0, "zero, NaN or infinite")


def require_positive_finite(
    layer_name: str, name: str, t: torch.Tensor, files: dict[str, str], shards: Iterable[str] = ()
) -> None:
    """Scales must be finite and > 0: a zero or NaN scale silently destroys a layer."""
    _require_scales(layer_name, name, t, files, shards, t.float() <= 0, "zero, negative, NaN or infinite")


def require_finite_within(
    layer_name: str, name: str, t: torch.Tensor, files: dict[str, str], bound: float
) -> None:
    """Offsets and zero points must be finite and within +-``bound``."""
    _require_scales(
        layer_name, name, t, files, (), t.float().abs() > bound, f"NaN, infinite or beyond +-{bound}"
    )


def require_kv_cache_values(layer_name: str, name: str, t: torch.Tensor, files: dict[str, str]) -> None:
    """KV-cache tensors: scales finite and positive, offsets (msModelSlim's C8) finite and within int8."""
    if name.endswith("offset"):
        require_finite_within(layer_name, name, t, files, 128)
    else:
        require_positive_finite(layer_name, name, t, files)


def _require_scales(layer_name, name, t, files, shards, refused: torch.Tensor, what: str) -> None:
    """CheckpointError naming the file, layer and tensor if any scale is non-finite or ``refused``."""
    bad = ~torch.isfinite(t.float()) | refused
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"{where(files, layer_name, name, shards)}: {int(bad.sum())} scale(s) are {what} "
            f"(first at index {idx}: {t.flatten()[bad.flatten()][0].item()})"
        )
