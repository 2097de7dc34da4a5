"""compressed-tensors' ``kv_cache_scheme`` -> what the attention layers must load, or a refusal.

A checkpoint that quantizes its KV cache stores static scales per attention layer for keys and
for values (``<block>.self_attn.k_scale`` / ``v_scale``). Two layouts are served:

- fp8 (e4m3), one scale per layer (strategy ``tensor``): the cache holds k / k_scale, read back as
  fp8 · k_scale. vLLM's attention backends serve exactly that on CPU (vLLM-CPU, x86 with AVX-512 or
  AMX) and CUDA.
- int8, symmetric, one scale per KV head (strategy ``attn_head``, shape [heads, 1, 1]) or per layer:
  vLLM-Ascend's C8 cache (``AscendC8KVCacheAttentionMethod``), which quantizes round(k / scale +
  offset) per channel, with offset 0 here. vLLM has no int8 cache on CPU or CUDA.

Everything else is refused here by name, before any weight is read, instead of being served with a
bf16 cache the user did not ask for. Which platform may serve which kind is ``serving.config``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_ptq_ascend.validation import CheckpointError

KV_SCALE_NAMES = ("k_scale", "v_scale")
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value: scale = max|k| / 448


@dataclass(frozen=True)
class KvCachePlan:
    """A served KV-cache quantization: ``kind`` "fp8" (e4m3) or "int8", static symmetric scales, one per
    layer (``strategy`` "tensor") or per KV head ("attn_head")."""

    kind: str = "fp8"
    strategy: str = "tensor"  # also "channel": msModelSlim's C8, a scale and an offset per channel

    def scales_per_layer(self, num_kv_heads: int, head_dim: int) -> int:
        return {"attn_head": num_kv_heads, "channel": num_kv_heads * head_dim}.get(self.strategy, 1)

    def describe(self) -> str:
        per = {"attn_head": "KV head", "channel": "channel"}.get(self.strategy, "layer")
        return f"KV cache {self.kind}, one scale per {per} for keys and for values"


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
    served = {("float", 8): "fp8", ("int", 8): "int8"}
    if (kind, bits) not in served:
        raise CheckpointError(
            f"{where}: type {kind!r} with num_bits {bits!r} is not served; the served KV caches are "
            "fp8 (type 'float', num_bits 8) and int8 (type 'int', num_bits 8, on Ascend)"
        )
    kind = served[kind, bits]
    if _field(scheme, "symmetric", True) is not True:
        raise CheckpointError(
            f"{where}: an asymmetric KV cache is not served (fp8 has no zero point, and ptq_ascend's "
            "int8 cache is symmetric)"
        )
    if _field(scheme, "dynamic", False) not in (False, None):
        raise CheckpointError(
            f"{where}: dynamic KV-cache scales are not served; the checkpoint must store static "
            "k_scale / v_scale per attention layer"
        )
    strategy = _field(scheme, "strategy", "tensor") or "tensor"
    strategies = {"fp8": ("tensor",), "int8": ("tensor", "attn_head")}[kind]
    if strategy not in strategies:
        why = {
            "fp8": "vLLM's CPU and CUDA attention read one k_scale and one v_scale per layer",
            "int8": "vLLM-Ascend's C8 cache takes a scale per layer or per channel",
        }[kind]
        raise CheckpointError(
            f"{where}: strategy {strategy!r} is not served for an {kind} cache; {why} (strategy "
            f"{' or '.join(repr(s) for s in strategies)})"
        )
    return KvCachePlan(kind=kind, strategy=strategy)


def checkpoint_block(prefix: str) -> str:
    """vLLM's attention layer 'model.layers.0.self_attn.attn' -> the checkpoint's block name."""
    return prefix.removesuffix(".attn")


def attention_block(scale_name: str) -> str | None:
    """'model.layers.3.self_attn' for 'model.layers.3.self_attn.k_scale' (None for other tensors)."""
    block, _, leaf = scale_name.rpartition(".")
    return block if leaf in KV_SCALE_NAMES else None
