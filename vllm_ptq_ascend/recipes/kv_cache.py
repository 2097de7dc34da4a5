"""``--kv-cache fp8|int8``: calibrated KV-cache scales on any preset, through llmcompressor's own
``kv_cache_scheme``.

- fp8 (e4m3): one scale per attention layer for keys and one for values, what vLLM's CPU and CUDA
  attention read.
- int8: symmetric, one scale per KV head (compressed-tensors' ``attn_head``), for vLLM-Ascend's C8
  cache, which ptq_ascend maps it onto on Ascend (``integrations/vllm_ascend_kv.py``). int8's grid
  is uniform, so a scale per head keeps a quiet head's keys off the few codes a loud head leaves it.

The scheme is set on the preset's last quantization modifier (QuantizationModifier, GPTQ or
AWQ all carry llmcompressor's ``kv_cache_scheme``), so the keys (after RoPE) and values are
observed on the preset's own calibration set, in every chain-of-thought mode it mixes, with the
preset's weights already in place. Observer: ``static_minmax``, the largest |k| and |v| over
all calibration tokens. llmcompressor's default (``minmax``) is a moving average that weights
the first batch most; a KV scale below a long trace's largest key saturates it, and e4m3's
range (448) makes the full range cheap to keep.
"""

from __future__ import annotations

KV_CACHE_KINDS = ("fp8", "int8")
KV_OBSERVER = "static_minmax"
# kind -> (compressed-tensors type, strategy, the cache's storage format)
KV_LAYOUTS = {
    "fp8": ("float", "tensor", "float8_e4m3fn"),
    "int8": ("int", "attn_head", "int8"),
}


def kv_cache_args(kind: str) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) for a KV cache of ``kind``."""
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"--kv-cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kind!r}")
    kind_type, strategy, _ = KV_LAYOUTS[kind]
    return {
        "num_bits": 8,
        "type": kind_type,
        "symmetric": True,
        "strategy": strategy,
        "dynamic": False,
        "observer": KV_OBSERVER,
    }


def with_kv_cache(modifiers: list, kind: str, recipe: str) -> list:
    """``modifiers`` with the KV-cache scheme on the last quantization modifier (rebuilt, so that
    llmcompressor's validators see it: the scheme makes the modifier need calibration data)."""
    from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin

    args = kv_cache_args(kind)
    carriers = [i for i, m in enumerate(modifiers) if isinstance(m, QuantizationMixin)]
    if not carriers:
        raise ValueError(f"recipe {recipe!r} has no quantization modifier to carry a KV-cache scheme")
    i = carriers[-1]
    m = modifiers[i]
    if m.kv_cache_scheme is not None:
        raise ValueError(f"recipe {recipe!r} already quantizes the KV cache")
    fields = {name: getattr(m, name) for name in m.model_fields_set}
    rebuilt = type(m).model_validate({**fields, "kv_cache_scheme": args})
    return [*modifiers[:i], rebuilt, *modifiers[i + 1 :]]


def kv_scale_names(model) -> set[str]:
    """The checkpoint names of the KV scales llmcompressor attached to ``model``'s attention blocks."""
    from vllm_ptq_ascend.formats.kv_cache import KV_SCALE_NAMES

    return {
        f"{name}.{p}"
        for name, module in model.named_modules()
        for p, _ in module.named_parameters(recurse=False)
        if p in KV_SCALE_NAMES
    }


def card_entry(kind: str) -> dict:
    _, strategy, storage = KV_LAYOUTS[kind]
    return {"kind": kind, "strategy": strategy, "observer": KV_OBSERVER, "format": storage}
