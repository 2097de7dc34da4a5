"""Integer weights with per-group / per-channel scales, shared by WNA16 and W4A8.

compressed-tensors stores them either packed (``pack-quantized``: ``weight_packed``
int32 [out, in*bits/32] plus ``weight_shape``) or one value per int8
(``int-quantized``: ``weight`` int8 [out, in]); ``weight_scale`` is [out, groups]
in both. These helpers register those tensors as vLLM parameters (so tensor
parallelism shards them) through the checked loaders, and check them once loaded.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import torch
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

from vllm_ptq_ascend.schemes.base import SCALE_DTYPES, LayerShape, PtqScheme
from vllm_ptq_ascend.validation import CheckpointError, TensorSpec, require_int_range, require_nonzero_finite


def setup_layer(layer: torch.nn.Module, shape: LayerShape) -> int:
    """Record the layer's geometry the backends read; returns this rank's output features."""
    layer.logical_widths = list(shape.output_partition_sizes)
    layer.params_dtype = shape.params_dtype
    layer.input_size_per_partition = shape.input_size_per_partition
    layer.output_size_per_partition = shape.out_features
    layer.full_weight_shape = (shape.output_size, shape.input_size)
    return shape.out_features


def group_layout(
    scheme: PtqScheme,
    group_size: int,
    input_size: int,
    input_size_per_partition: int,
    has_g_idx: bool = False,
) -> tuple[int, bool]:
    """(scale columns held by this rank, whether they are split across row-parallel ranks).

    ``group_size`` -1 means per channel. Raises if the group size does not divide the
    input (of this rank, for a row-parallel layer without act-order).
    """
    size = input_size if group_size == -1 else group_size
    if input_size % size or (group_size != -1 and input_size_per_partition % size and not has_g_idx):
        raise CheckpointError(
            f"{scheme.where('weight_scale')}: group size "
            f"{group_size} does not divide the input size {input_size_per_partition}"
            f"{'' if input_size == input_size_per_partition else f' of this rank (full {input_size})'}"
        )
    row_parallel = input_size != input_size_per_partition
    # With act-order, a rank's input channels belong to arbitrary groups, so a
    # row-parallel rank keeps every group's scale (as vLLM's Marlin path does).
    partition_groups = not (has_g_idx and row_parallel) and group_size != -1
    n_groups = (input_size_per_partition if partition_groups else input_size) // size
    return n_groups, partition_groups


def packed_weight_spec(num_bits: int, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """``weight_packed`` and ``weight_shape`` as :func:`register_packed_weight` and
    :func:`register_weight_shape` create them (one unfused layer, no tensor parallelism)."""
    return {
        "weight_packed": TensorSpec(
            (torch.int32,), ((out_features, math.ceil(in_features * num_bits / 32)),)
        ),
        "weight_shape": TensorSpec((torch.int64, torch.int32), ((2,),)),
    }


def int8_weight_spec(out_features: int, in_features: int) -> dict[str, TensorSpec]:
    return {"weight": TensorSpec((torch.int8,), ((out_features, in_features),))}


def group_scale_spec(
    scheme: PtqScheme, group_size: int, out_features: int, in_features: int, has_g_idx: bool = False
) -> dict[str, TensorSpec]:
    """``weight_scale`` [out, groups]; raises (as create_weights does) if the group size does not divide."""
    n_groups, _ = group_layout(scheme, group_size, in_features, in_features, has_g_idx)
    return {"weight_scale": TensorSpec(SCALE_DTYPES, ((out_features, n_groups),), scale=True, signed=True)}


def register_packed_weight(
    layer: torch.nn.Module,
    scheme: PtqScheme,
    num_bits: int,
    out_features: int,
    input_size_per_partition: int,
    weight_loader: Callable,
) -> None:
    """``weight_packed`` int32 [out, in*bits/32] and ``weight_shape`` (pack-quantized)."""
    layer.register_parameter(
        "weight_packed",
        PackedvLLMParameter(
            data=torch.empty(
                out_features,
                math.ceil(input_size_per_partition * num_bits / 32),
                dtype=torch.int32,
            ),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=Fraction(32, num_bits),
            weight_loader=scheme.loader(weight_loader, "weight_packed", (torch.int32,)),
        ),
    )


def register_weight_shape(layer: torch.nn.Module, scheme: PtqScheme, weight_loader: Callable) -> None:
    layer.register_parameter(
        "weight_shape",
        BasevLLMParameter(
            data=torch.empty(2, dtype=torch.int64),
            weight_loader=scheme.loader(weight_loader, "weight_shape", (torch.int64, torch.int32)),
        ),
    )


def register_int8_weight(
    layer: torch.nn.Module,
    scheme: PtqScheme,
    out_features: int,
    input_size_per_partition: int,
    weight_loader: Callable,
) -> None:
    """``weight`` int8 [out, in], one value per byte (int-quantized)."""
    layer.register_parameter(
        "weight",
        ModelWeightParameter(
            data=torch.empty(out_features, input_size_per_partition, dtype=torch.int8),
            input_dim=1,
            output_dim=0,
            weight_loader=scheme.loader(weight_loader, "weight", (torch.int8,)),
        ),
    )


def register_group_scales(
    layer: torch.nn.Module,
    scheme: PtqScheme,
    out_features: int,
    n_groups: int,
    partition_groups: bool,
    dtype: torch.dtype,
    weight_loader: Callable,
) -> None:
    """``weight_scale`` [out, groups]: split along the input too when groups are partitioned."""
    loader = scheme.loader(weight_loader, "weight_scale", SCALE_DTYPES)
    data = torch.empty(out_features, n_groups, dtype=dtype)
    register_group_param(layer, "weight_scale", data, loader, partition_groups)


def register_group_param(
    layer: torch.nn.Module, name: str, data: torch.Tensor, loader: Callable, partition_groups: bool
) -> None:
    """A tensor with one column per group [out, groups], split along the output and, when the groups
    are partitioned across ranks (``group_layout``), along the input too."""
    args = dict(data=data, weight_loader=loader)
    layer.register_parameter(
        name,
        GroupQuantScaleParameter(output_dim=0, input_dim=1, **args)
        if partition_groups
        else ChannelQuantScaleParameter(output_dim=0, **args),
    )


def validate_scales_and_shape(scheme: PtqScheme, layer: torch.nn.Module) -> None:
    """Scales finite and non-zero; a packed weight's ``weight_shape`` matches the model's layer."""
    require_nonzero_finite(
        scheme.layer_name, "weight_scale", layer.weight_scale.data, scheme.files, scheme.shards
    )
    shape = getattr(layer, "weight_shape", None)
    if shape is None:
        return
    # weight_shape holds the unfused shard's full shape; its input size must match ours.
    in_features = int(shape.data[1])
    if in_features != layer.full_weight_shape[1]:
        raise CheckpointError(
            f"{scheme.where('weight_shape')}: says input size "
            f"{in_features}, the model's layer has {layer.full_weight_shape[1]}"
        )


def validate_int_range(scheme: PtqScheme, layer: torch.nn.Module, num_bits: int) -> None:
    """An int-quantized ``weight`` of a narrower type must hold values of that type only."""
    w = getattr(layer, "weight", None)
    if w is None:
        return
    require_int_range(scheme.where("weight"), w.data, num_bits, f"{num_bits}-bit weights")


class IntWeightTensors:
    """Symmetric int weights of ``bits`` with per-group or per-channel scales, as the W4A8, W4A4 and
    FlatQuant schemes hold them: ``weight_packed`` + ``weight_shape`` (pack-quantized) or ``weight``
    int8 (int-quantized), and ``weight_scale`` [out, groups] in float32 whatever the model dtype
    (the output is dequantized in float32 anyway, and float32 checkpoint scales are used as written)."""

    def __init__(self, bits: int, packed: bool, group_size: int = -1) -> None:
        self.bits, self.packed, self.group_size = bits, packed, group_size
        self.tensor_names = (
            ("weight_packed", "weight_scale", "weight_shape") if packed else ("weight", "weight_scale")
        )

    def describe(self) -> str:
        groups = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        fmt = "pack-quantized" if self.packed else "int-quantized"
        return f"int{self.bits} symmetric {groups} weights, {fmt}"

    def checkpoint_tensors(
        self, scheme: PtqScheme, out_features: int, in_features: int
    ) -> dict[str, TensorSpec]:
        weight = (
            packed_weight_spec(self.bits, out_features, in_features)
            if self.packed
            else int8_weight_spec(out_features, in_features)
        )
        return weight | group_scale_spec(scheme, self.group_size, out_features, in_features)

    def register(self, layer: torch.nn.Module, scheme: PtqScheme, shape: LayerShape, weight_loader) -> None:
        out_features = setup_layer(layer, shape)
        n_groups, partition_groups = group_layout(
            scheme, self.group_size, shape.input_size, shape.input_size_per_partition
        )
        in_features = shape.input_size_per_partition
        if self.packed:
            register_packed_weight(layer, scheme, self.bits, out_features, in_features, weight_loader)
            register_weight_shape(layer, scheme, weight_loader)
        else:
            register_int8_weight(layer, scheme, out_features, in_features, weight_loader)
        register_group_scales(
            layer, scheme, out_features, n_groups, partition_groups, torch.float32, weight_loader
        )

    def validate(self, scheme: PtqScheme, layer: torch.nn.Module) -> None:
        validate_scales_and_shape(scheme, layer)
        validate_int_range(scheme, layer, self.bits)


class IntWeightsScheme(PtqScheme):
    """A scheme whose checkpoint tensors are exactly ``self.weights`` (W4A8, W4A4)."""

    weights: IntWeightTensors

    def checkpoint_tensors(self, out_features, in_features):
        return self.weights.checkpoint_tensors(self, out_features, in_features)

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        self.weights.register(layer, self, shape, weight_loader)
        self.choose_kernel(shape)

    def validate_loaded(self, layer):
        self.weights.validate(self, layer)
