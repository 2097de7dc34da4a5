"""Int8 (C8) KV caches on Ascend, served by vLLM-Ascend's own C8 attention: ours and msModelSlim's.

vLLM-Ascend's ``AscendC8KVCacheAttentionMethod`` (``quantization/methods/kv_c8.py``) makes the layer's
cache int8, switches its attention to ``AscendC8AttentionBackendImpl`` and loads ``k_cache_scale`` /
``k_cache_offset`` / ``v_cache_scale`` / ``v_cache_offset``. That backend stores
clamp(round(k / scale + offset), -128, 127) per channel (``_quantize_kv_to_int8``) and reads it back
as int8 · scale; a one-value scale is broadcast, a per-channel one ([heads · head_dim], all heads) is
cut to this rank's heads (``_prepare_c8_scales``).

- A compressed-tensors int8 checkpoint (``--kv-cache int8``) stores symmetric ``k_scale`` / ``v_scale``
  per layer or per KV head ([heads, 1, 1]) and quantizes round(k / scale): the same grid with offset
  0. Its scales go to the C8 parameters, widened from one per head to one per channel; the offsets
  keep the zeros the method starts them at.
- msModelSlim's C8 (``kv_cache_type: C8``) stores ``k_proj.kv_cache_scale`` / ``kv_cache_offset`` per
  channel: loaded as they are, under the names vLLM-Ascend's own ModelSlim mapper gives them.

Around the method this adds what it lacks, as ``serving/kv_cache_method.py`` does for fp8: a scale
or offset that is missing, of the wrong size, or not finite (scales: and positive; offsets: within
int8) is a load error naming file, layer and tensor.
"""

from __future__ import annotations

import functools
import importlib

import torch

from vllm_ptq_ascend.formats.kv_cache import KvCachePlan, checkpoint_block
from vllm_ptq_ascend.validation import CheckpointError, require_kv_cache_values, where

C8_MODULE = "vllm_ascend.quantization.methods.kv_c8"
ADAPTERS_MODULE = "vllm_ascend.quantization.method_adapters"
# checkpoint tensor (under the attention block) -> the C8 method's parameter, per format
CT_TENSORS = {"k_scale": "k_cache_scale", "v_scale": "v_cache_scale"}
MODELSLIM_TENSORS = {
    "k_proj.kv_cache_scale": "k_cache_scale",
    "k_proj.kv_cache_offset": "k_cache_offset",
    "v_proj.kv_cache_scale": "v_cache_scale",
    "v_proj.kv_cache_offset": "v_cache_offset",
}


def cache_scale_mapper(tensors: dict[str, str]):
    """checkpoint ``<block>.self_attn.<tensor>`` -> the C8 parameter ``<block>.self_attn.attn.<param>``
    (vLLM's AutoWeightsLoader applies the quantization config's mapper to the weight stream; for
    msModelSlim these are the suffixes of vLLM-Ascend's own ``get_cache_scale_mapper``)."""
    import re

    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper(
        orig_to_new_regex={
            re.compile(rf"\.self_attn\.{re.escape(tensor)}$"): f".self_attn.attn.{param}"
            for tensor, param in tensors.items()
        }
    )


def _vllm_ascend(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CheckpointError(
            "this checkpoint's int8 (C8) KV cache is served on Ascend by vLLM-Ascend's C8 attention, and "
            f"{module} cannot be imported ({e}); install vllm-ascend"
        ) from e


def c8_kv_cache_method(quant_config, plan: KvCachePlan, prefix: str, tensors: dict[str, str]):
    """vLLM-Ascend's KV-cache method for its C8 scheme, with our checks, for the layer ``prefix``;
    ``tensors``: the checkpoint's tensor -> C8 parameter (``CT_TENSORS``, ``MODELSLIM_TENSORS``)."""
    c8 = _vllm_ascend(C8_MODULE)
    adapters = _vllm_ascend(ADAPTERS_MODULE)
    scheme = c8.AscendC8KVCacheAttentionMethod({"kv_cache_type": "C8"}, prefix)
    return _checked_method(adapters.AscendKVCacheMethod)(quant_config, plan, prefix, scheme, tensors)


@functools.cache
def _checked_method(base: type) -> type:
    """``base`` (vLLM-Ascend's AscendKVCacheMethod, importable only where vLLM-Ascend is) with checked
    scale loading."""

    class PtqC8KVCacheMethod(base):
        def __init__(self, quant_config, plan: KvCachePlan, prefix: str, scheme, tensors: dict) -> None:
            super().__init__(scheme)
            self.files = getattr(quant_config, "files", {}) or {}
            self.plan = plan
            self.block = checkpoint_block(prefix)
            self.tensors = tensors

        def create_weights(self, layer: torch.nn.Module) -> None:
            super().create_weights(layer)
            for name, param_name in self.tensors.items():
                param = getattr(layer, param_name)
                param.weight_loader = self._loader(layer, name, param.weight_loader)

        def _loader(self, layer: torch.nn.Module, name: str, upstream_loader):
            expected = self.plan.scales_per_layer(_total_kv_heads(layer), layer.head_size)
            head_size = layer.head_size

            def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor) -> None:
                if loaded_weight.numel() != expected:
                    raise CheckpointError(
                        f"{where(self.files, self.block, name)}: shape {tuple(loaded_weight.shape)}, but the "
                        f"KV-cache scheme (strategy {self.plan.strategy!r}) has {expected} value(s) per layer"
                    )
                require_kv_cache_values(self.block, name, loaded_weight, self.files)
                values = loaded_weight.flatten()
                if self.plan.strategy == "attn_head":  # one per KV head -> one per channel, as C8 reads
                    values = values.repeat_interleave(head_size)
                upstream_loader(param, values)
                param.ptq_loaded = True

            return load

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            for name, param_name in self.tensors.items():
                if not getattr(getattr(layer, param_name), "ptq_loaded", False):
                    raise CheckpointError(
                        f"{where(self.files, self.block, name)}: missing from the checkpoint (its KV "
                        "cache is int8 with calibrated scales)"
                    )
            super().process_weights_after_loading(layer)

    return PtqC8KVCacheMethod


def _total_kv_heads(layer: torch.nn.Module) -> int:
    """The model's KV heads (a per-head scale holds all of them; the C8 backend keeps this rank's)."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_world_size

    model_config = get_current_vllm_config().model_config
    if model_config is not None:
        return model_config.get_total_num_kv_heads()
    return layer.num_kv_heads * get_tensor_model_parallel_world_size()
