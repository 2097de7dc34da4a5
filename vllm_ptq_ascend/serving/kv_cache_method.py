"""The KV-cache method ``ptq_ascend`` gives attention layers: vLLM's own compressed-tensors one,
with the checks it lacks.

vLLM's ``CompressedTensorsKVCacheMethod`` creates ``k_scale`` / ``v_scale`` filled with ones and
uses whatever is there after loading, so a checkpoint missing a layer's scales is served with
scale 1.0 (keys above 448 saturate) and a zero or NaN scale silently ruins the layer. Here each
scale must arrive, hold one value, and be finite and positive; the error names the file, the
layer and the tensor. The cache itself (fp8, e4m3) is vLLM's: vLLM's ``Attention`` switches an
``auto`` cache dtype to fp8 when the config has a ``kv_cache_scheme``, as for compressed-tensors. On
vLLM-CPU the cache writes are made to round to nearest (``fp8_cache_write``).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsKVCacheMethod,
)

from vllm_ptq_ascend.formats.kv_cache import KV_SCALE_NAMES, checkpoint_block
from vllm_ptq_ascend.serving.fp8_cache_write import round_cache_writes_to_nearest
from vllm_ptq_ascend.validation import CheckpointError, require_positive_finite, where


class PtqKVCacheMethod(CompressedTensorsKVCacheMethod):
    def __init__(self, quant_config, prefix: str):
        super().__init__(quant_config)
        self.block = checkpoint_block(prefix)

    def _at(self, name: str) -> str:
        return where(getattr(self.quant_config, "files", {}) or {}, self.block, name)

    def create_weights(self, layer: torch.nn.Module) -> None:
        super().create_weights(layer)
        for name in KV_SCALE_NAMES:
            getattr(layer, name).weight_loader = self._loader(name)

    def _loader(self, name: str):
        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor) -> None:
            if loaded_weight.numel() != 1:
                raise CheckpointError(
                    f"{self._at(name)}: shape {tuple(loaded_weight.shape)}, but the kv_cache_scheme "
                    "(strategy 'tensor') has one scale per layer"
                )
            param.data.copy_(loaded_weight.reshape(param.shape).to(param.dtype))
            param.ptq_loaded = True

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        files = getattr(self.quant_config, "files", {}) or {}
        for name in KV_SCALE_NAMES:
            param = getattr(layer, name, None)
            if param is None:  # already processed (a reload)
                return
            if not getattr(param, "ptq_loaded", False):
                raise CheckpointError(
                    f"{self._at(name)}: missing from the checkpoint (its kv_cache_scheme stores the KV "
                    "cache in fp8 with one calibrated scale per attention layer)"
                )
            require_positive_finite(self.block, name, param.data, files)
        super().process_weights_after_loading(layer)
        round_cache_writes_to_nearest(layer)
