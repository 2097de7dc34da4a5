"""compressed-tensors' ``kv_cache_scheme`` -> what the attention layers must load, or a refusal.

A checkpoint that quantizes its KV cache stores one static scale per attention layer for keys
and one for values (``<block>.self_attn.k_scale`` / ``v_scale``): the cache holds k / k_scale
in fp8 (e4m3), read back as fp8 · k_scale. vLLM's attention backends serve exactly that on
CPU (vLLM-CPU, x86 with AVX-512 or AMX) and CUDA. Everything else is refused here by name,
before any weight is read, instead of being served with a bf16 cache the user did not ask for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_ptq_ascend.validation import CheckpointError

KV_SCALE_NAMES = ("k_scale", "v_scale")
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value: scale = max|k| / 448


@dataclass(frozen=True)
class KvCachePlan:
    """A served KV-cache quantization: fp8 (e4m3) with one static scale per layer and tensor."""

    kind: str = "fp8"
    strategy: str = "tensor"

    def describe(self) -> str:
        return f"KV cache {self.kind}, one scale per layer for keys and for values"


def _field(scheme: dict, key: str, default: Any = None) -> Any:
    value = scheme.get(key, default)
    return getattr(value, "value", value)  # enums from compressed-tensors' own types


def plan_kv_cache(scheme: Any) -> KvCachePlan | None:
    """The plan for ``quantization_config.kv_cache_scheme`` (None: the cache stays unquantized)."""
    if scheme is None:
        return None
    where = "config.json: quantization_config.kv_cache_scheme"
    if hasattr(scheme, "model_dump"):
        scheme = scheme.model_dump()
    if not isinstance(scheme, dict):
        raise CheckpointError(f"{where} must be a JSON object, found {type(scheme).__name__}")
    kind, bits = _field(scheme, "type"), _field(scheme, "num_bits")
    if kind == "int" and bits == 8:
        raise CheckpointError(
            f"{where}: an int8 KV cache is not served: vLLM's CPU and CUDA attention backends store "
            "fp8 caches only, and vLLM-Ascend's int8 (C8) attention is not mapped by ptq_ascend yet; "
            "quantize with --kv-cache fp8, or without KV-cache quantization"
        )
    if (kind, bits) != ("float", 8):
        raise CheckpointError(
            f"{where}: type {kind!r} with num_bits {bits!r} is not served; the served KV cache is "
            "fp8 (type 'float', num_bits 8)"
        )
    if _field(scheme, "symmetric", True) is not True:
        raise CheckpointError(f"{where}: an asymmetric KV cache is not served (fp8 has no zero point)")
    if _field(scheme, "dynamic", False) not in (False, None):
        raise CheckpointError(
            f"{where}: dynamic KV-cache scales are not served; the checkpoint must store static "
            "k_scale / v_scale per attention layer"
        )
    strategy = _field(scheme, "strategy", "tensor") or "tensor"
    if strategy != "tensor":
        raise CheckpointError(
            f"{where}: strategy {strategy!r} is not served; vLLM's CPU and CUDA attention read one "
            "k_scale and one v_scale per layer (strategy 'tensor')"
        )
    return KvCachePlan()


def attention_block(scale_name: str) -> str | None:
    """'model.layers.3.self_attn' for 'model.layers.3.self_attn.k_scale' (None for other tensors)."""
    block, _, leaf = scale_name.rpartition(".")
    return block if leaf in KV_SCALE_NAMES else None
