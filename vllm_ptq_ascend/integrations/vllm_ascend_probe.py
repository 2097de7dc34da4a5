"""Whether vLLM-Ascend's own compressed-tensors config can serve a checkpoint, asked of its own code.

``serving.config`` asks it before claiming a compressed-tensors checkpoint with no flag on Ascend.
"""

from __future__ import annotations

from typing import Any

from vllm_ptq_ascend.formats.compressed_tensors import CT_METHOD


def vllm_ascend_cannot_serve(hf_quant_cfg: dict[str, Any]) -> str | None:
    """Why vLLM-Ascend's compressed-tensors config cannot serve this checkpoint (decided by its own
    code: its parser, ``_detect_quant_type`` and registry), or None (it can, or it is not the
    ``compressed-tensors`` method here: no vLLM-Ascend, or another platform)."""
    import copy
    import importlib

    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        cls = get_quantization_config(CT_METHOD)
    except ValueError:
        return None
    if not cls.__module__.startswith("vllm_ascend."):
        return None
    from vllm_ptq_ascend.formats.transforms import parse_transform_config

    if parse_transform_config(hf_quant_cfg.get("transform_config")):
        return "vLLM-Ascend's compressed-tensors config ignores its online transform_config"
    if hf_quant_cfg.get("kv_cache_scheme") is not None:
        # its get_quant_method gives attention layers no method: the cache would stay bf16, unscaled
        return "vLLM-Ascend's compressed-tensors config ignores its kv_cache_scheme"
    try:
        config = cls.from_config(copy.deepcopy(hf_quant_cfg))
    except Exception as e:  # its parser (compressed-tensors) refuses the config
        return f"vLLM-Ascend cannot parse it ({e})"
    registry = importlib.import_module("vllm_ascend.quantization.methods")
    for target, scheme in config.target_scheme_map.items():
        try:
            quant_type = config._detect_quant_type(
                scheme["weights"], scheme["input_activations"], scheme["format"]
            )
        except NotImplementedError:
            return f"vLLM-Ascend has no quant type for target {target!r}"
        scheme_cls = registry.get_scheme_class(quant_type, "linear")
        if scheme_cls is None:
            return f"vLLM-Ascend has no linear scheme for {quant_type} (target {target!r})"
        if quant_type in MODELSLIM_ONLY and not getattr(scheme_cls, "_ptq_ascend_adapter", False):
            return f"vLLM-Ascend's own {quant_type} linear reads msModelSlim checkpoints only ({target!r})"
    return None


# vLLM-Ascend linears that serve msModelSlim's layout only, though its compressed-tensors detector maps
# llmcompressor groups to them: W4A8_DYNAMIC ("This method supports only weights quantized by
# msModelSlim", methods/w4a8.py in 0.23.0.post1 and 0.26.0rc1)
MODELSLIM_ONLY = ("W4A8_DYNAMIC",)
