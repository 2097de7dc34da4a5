"""The vLLM LinearMethod that delegates to a layer's scheme."""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)

from vllm_ptq_ascend.schemes.base import LayerShape


@register_weight_loader_v2_supported_method
class PtqLinearMethod(LinearMethodBase):
    """Registered for weight_loader_v2, so vLLM's parameter classes shard scales and zero points."""

    def __init__(self, quant_config):
        self.quant_config = quant_config

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        shape = LayerShape(
            input_size=input_size,
            output_size=output_size,
            input_size_per_partition=input_size_per_partition,
            output_partition_sizes=tuple(output_partition_sizes),
            params_dtype=params_dtype,
            # vLLM's row-parallel loader gives rank r the r-th slice of the input (the layer's own TP
            # rank: vLLM-Ascend may run o_proj/down_proj on a TP group of their own)
            input_shard=getattr(layer, "tp_rank", 0) if input_size_per_partition < input_size else 0,
        )
        layer.scheme.create_weights(layer, shape, extra_weight_attrs["weight_loader"])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.scheme.process_weights_after_loading(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return layer.scheme.apply_weights(layer, x, bias)
