"""Our compressed-tensors schemes behind vLLM-Ascend's own compressed-tensors config.

On Ascend, vLLM-Ascend replaces vLLM's ``compressed-tensors`` method with
``AscendCompressedTensorsConfig`` (``vllm_ascend/quantization/compressed_tensors_config.py`` in
0.23.0.post1 and 0.26.0rc1). It maps each config group to a quant type (``_detect_quant_type``: int4
group weight-only -> "W4A16", int4 weights with int8 per-token dynamic activations -> "W4A8_DYNAMIC")
and builds the scheme registered for ``(quant_type, "linear")`` with no arguments, the checkpoint's
``quantization_config`` being ``quant_description``. Neither release has a dense W4A16 linear
(vLLM-Ascend issue #6481); W4A8_DYNAMIC's linear is msModelSlim-only and removed on its main
(#13713). Where our class holds the key, a plain llmcompressor checkpoint then runs on Ascend with no
flag, on our compressed-tensors schemes: zero points (AWQ), act-order ``g_idx`` (GPTQ), W4A8 per group
and per channel. (Groups their detector maps to nothing, such as W8A16 or asymmetric static W8A8, are
refused by vLLM-Ascend before any scheme is built: ``--quantization ptq_ascend`` serves them.)

The scheme registers its tensors, as vLLM parameter classes, on a scratch module; they are handed to
vLLM-Ascend, which re-registers each as a plain parameter loaded by the layer's v1 weight loader with
attributes that depend on the hook that returned it. Each tensor goes to the hook whose attributes
make that loader cut the same slice the v2 loader would (:func:`hook_for`); where no hook does
(this rank's input columns of a tensor vLLM-Ascend loads whole), it is handed over at full width and
cut after loading, as the msModelSlim adapters do.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from vllm_ptq_ascend.formats.compressed_tensors import CT_METHOD
from vllm_ptq_ascend.integrations.vllm_ascend_layers import (
    layer_under_construction,
    narrowed_names,
    noop_loader,
    quant_description,
)
from vllm_ptq_ascend.schemes.base import LayerShape
from vllm_ptq_ascend.validation import CheckpointError

# keys vLLM-Ascend's _is_dynamic_token_w4a8 writes into the description it shares with its schemes
ASCEND_ADDED_KEYS = ("group_size", "version", "ascend_quant_method", "weight_strategy")


def is_compressed_tensors(desc: dict[str, Any]) -> bool:
    return desc.get("quant_method") == CT_METHOD or isinstance(desc.get("config_groups"), dict)


@functools.lru_cache(maxsize=8)
def _config(desc_json: str, mapping_json: str):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    config = PtqAscendConfig.from_config(json.loads(desc_json))
    config.packed_modules_mapping = json.loads(mapping_json)
    return config


def hook_for(param) -> str:
    """The vLLM-Ascend hook whose loader attributes match this vLLM parameter's sharding.

    get_weight: input_dim=1, output_dim=0; get_perchannel_param: output_dim=0;
    get_pergroup_param: output_dim=0 (+ packing, + input_dim for the names it narrows);
    get_pertensor_param: none (copied whole)."""
    input_dim, output_dim = getattr(param, "input_dim", None), getattr(param, "output_dim", None)
    packed_dim = getattr(param, "packed_dim", None)
    if output_dim == 0 and packed_dim == 0 and param.dim() == 2:
        return "get_pergroup_param"  # packed along the output (AWQ zero points): needs packed_factor
    if output_dim == 0 and input_dim == 1 and param.dim() == 2:
        return "get_weight"
    if output_dim == 0 and input_dim is None:
        return "get_perchannel_param"
    if output_dim is None:
        return "get_pertensor_param"  # per-tensor scales, weight_shape; 1-D g_idx (cut after loading)
    raise CheckpointError(
        f"cannot hand tensor with input_dim={input_dim}, output_dim={output_dim} to vLLM-Ascend"
    )


class CompressedTensorsLinear:
    """A vLLM-Ascend linear scheme running one of our compressed-tensors schemes."""

    def __init__(self, quant_type: str) -> None:
        self.quant_type = quant_type
        desc = quant_description()
        layer, prefix = layer_under_construction()
        if layer is None:
            raise CheckpointError(
                f"config.json: vLLM-Ascend built a {quant_type} scheme outside a layer's get_quant_method; "
                "vllm-ptq-ascend cannot tell which layer it is for (serve with --quantization ptq_ascend)"
            )
        from vllm.config import get_current_vllm_config

        clean = {k: v for k, v in desc.items() if k not in ASCEND_ADDED_KEYS}
        mapping = getattr(get_current_vllm_config().quant_config, "packed_modules_mapping", None) or {}
        config = _config(json.dumps(clean, sort_keys=True), json.dumps(dict(mapping), sort_keys=True))
        if config.transforms:  # online ones; those fused into the weights (SpinQuant R1/R2) need nothing
            raise CheckpointError(
                f"config.json: layer '{prefix}': quantization_config has an online transform_config, which "
                "vLLM-Ascend's compressed-tensors config does not apply; serve this checkpoint with "
                "--quantization ptq_ascend"
            )
        try:
            scheme = config.scheme_for(prefix, layer)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}; vLLM-Ascend resolved layer '{prefix}' to {quant_type!r} (serve with "
                "--quantization ptq_ascend for this checkpoint's other groups)"
            ) from e
        if scheme is None:
            raise CheckpointError(
                f"config.json: layer '{prefix}': vLLM-Ascend resolved it to {quant_type!r} but no config "
                "group of quantization_config matches it for vllm-ptq-ascend"
            )
        self.scheme, self.prefix, self._layer = scheme, prefix, layer
        self.scratch = torch.nn.Module()
        self.hooks: dict[str, dict[str, torch.Tensor]] = {}
        self.row_whole: dict[str, int] = {}  # name -> this rank's size along the input dim
        self.row_tp = 1

    # -- vLLM-Ascend's linear scheme interface --------------------------------------------------
    def get_weight(self, input_size: int, output_size: int, params_dtype: torch.dtype) -> dict[str, Any]:
        layer = self._layer
        shape = LayerShape(
            input_size=layer.input_size,
            output_size=layer.output_size,
            input_size_per_partition=input_size,
            output_partition_sizes=tuple(layer.output_partition_sizes),
            params_dtype=params_dtype,
            input_shard=getattr(layer, "tp_rank", 0) if input_size < layer.input_size else 0,
        )
        self.scheme.create_weights(self.scratch, shape, noop_loader)
        hooks: dict[str, dict[str, Any]] = {
            h: {} for h in ("get_weight", "get_pertensor_param", "get_perchannel_param", "get_pergroup_param")
        }
        for name, param in self.scratch.named_parameters(recurse=False):
            hooks[hook_for(param)][name] = param
        self.row_tp = layer.input_size // input_size
        row = self.row_tp > 1
        for hook in ("get_pertensor_param", "get_pergroup_param"):
            names = tuple(hooks[hook])
            narrowed = narrowed_names(hook, names) if row and names else frozenset()
            for name in names:
                param = hooks[hook][name]
                input_dim = getattr(param, "input_dim", None)
                if row and input_dim is not None and name not in narrowed:  # loaded whole: widen, cut later
                    self.row_whole[name] = param.shape[input_dim]
                    shape = list(param.shape)
                    shape[input_dim] *= self.row_tp
                    hooks[hook][name] = param.data.new_zeros(shape)
        packed = [getattr(self.scratch, n) for n in hooks["get_pergroup_param"]]
        self.hooks = {h: {n: getattr(t, "data", t) for n, t in d.items()} for h, d in hooks.items()}
        if packed:  # every pergroup tensor is packed along the output by the same factor (zero points)
            factors = {p.packed_factor for p in packed}
            if len(factors) > 1:
                raise CheckpointError(
                    f"{self.scheme.where('weight_zero_point')}: mixed packing {sorted(factors)}"
                )
            self.hooks["get_pergroup_param"] |= {"_packed_dim": 0, "_packed_factor": factors.pop()}
        return dict(self.hooks["get_weight"])

    def get_pertensor_param(self, params_dtype: torch.dtype, **kwargs: Any) -> dict[str, Any]:
        return dict(self.hooks["get_pertensor_param"])

    def get_perchannel_param(self, output_size: int, params_dtype: torch.dtype) -> dict[str, Any]:
        return dict(self.hooks["get_perchannel_param"])

    def get_pergroup_param(self, input_size, output_size, params_dtype, layer_type=None) -> dict[str, Any]:
        return dict(self.hooks["get_pergroup_param"])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from vllm_ptq_ascend.schemes.msmodelslim_common import set_param

        rank = getattr(layer, "tp_rank", 0)
        for name, size in self.row_whole.items():
            full = getattr(layer, name).data
            dim = getattr(self.scratch, name).input_dim
            set_param(layer, name, full.narrow(dim, rank * size, size).contiguous())
        for key, value in vars(self.scratch).items():  # the geometry and settings create_weights recorded
            if not key.startswith("_") and key != "training":
                setattr(layer, key, value)
        for hook in self.hooks.values():
            for name in hook:
                if not name.startswith("_"):
                    getattr(layer, name).ptq_loaded_shards = {None}  # vLLM-Ascend's loader tracks nothing
        self.scheme.process_weights_after_loading(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias=None, tp_rank: int | None = 0
    ) -> torch.Tensor:
        return self.scheme.apply_weights(layer, x, bias)
