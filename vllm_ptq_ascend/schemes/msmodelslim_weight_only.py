"""msModelSlim W8A16 / W4A16 -> WNA16Scheme (packed into compressed-tensors' int32 layout)."""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from vllm.model_executor.parameter import (
    ModelWeightParameter,
    PackedvLLMParameter,
)

from vllm_ptq_ascend.formats.plan import MODELSLIM_FORMAT
from vllm_ptq_ascend.schemes import int_weights
from vllm_ptq_ascend.schemes.base import LayerShape
from vllm_ptq_ascend.schemes.msmodelslim_common import (
    _ModelSlimScheme,
    drop,
    loaded,
    set_param,
    unpack_int4_pairs,
)
from vllm_ptq_ascend.schemes.wna16 import WNA16Scheme
from vllm_ptq_ascend.validation import FLOAT_DTYPES, CheckpointError, TensorSpec, require_int_range


class ModelSlimWeightOnly(_ModelSlimScheme):
    """W8A16 / W4A16 -> WNA16Scheme."""

    serves = ((MODELSLIM_FORMAT, "W8A16"), (MODELSLIM_FORMAT, "W4A16"))

    tensor_names = ("weight", "weight_scale")

    def __init__(self, layer_name, *, num_bits, group_size, packed, files=None, shards=None):
        super().__init__(layer_name, files, shards)
        self.num_bits = num_bits
        self.group_size = group_size or -1
        self.packed = packed
        self.label = f"W{num_bits}A16"

    def packed_dim(self) -> int | None:
        """Dim holding two int4 per int8 (None: one value per int8)."""
        return (0 if self.group_size != -1 else 1) if self.packed else None

    def checkpoint_tensors(self, out_features, in_features):
        shape = [out_features, in_features]
        if self.packed_dim() is not None:
            shape[self.packed_dim()] //= 2
        n_groups, _ = int_weights.group_layout(self, self.group_size, in_features, in_features)
        groups = ((out_features, n_groups),)
        return {
            "weight": TensorSpec((torch.int8,), (tuple(shape),)),
            "weight_scale": TensorSpec(FLOAT_DTYPES, groups, scale=True),
            "weight_offset": TensorSpec(FLOAT_DTYPES, groups, required=False),
        }

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        out = int_weights.setup_layer(layer, shape)
        self.shape = shape
        n_groups, partition_groups = int_weights.group_layout(
            self, self.group_size, shape.input_size, shape.input_size_per_partition
        )
        w_loader = self.loader(weight_loader, "weight", (torch.int8,))
        if not self.packed:
            layer.register_parameter(
                "weight",
                ModelWeightParameter(
                    data=torch.empty(out, shape.input_size_per_partition, dtype=torch.int8),
                    input_dim=1,
                    output_dim=0,
                    weight_loader=w_loader,
                ),
            )
        else:  # two int4 per int8: along the output dim per group, the input dim per channel
            dim = 0 if self.group_size != -1 else 1
            dims = [out, shape.input_size_per_partition]
            if dims[dim] % 2:
                raise CheckpointError(f"{self.where('weight')}: packed int4 needs an even size, got {dims}")
            dims[dim] //= 2
            layer.register_parameter(
                "weight",
                PackedvLLMParameter(
                    data=torch.empty(*dims, dtype=torch.int8),
                    input_dim=1,
                    output_dim=0,
                    packed_dim=dim,
                    packed_factor=2,
                    weight_loader=w_loader,
                ),
            )
        for name in ("weight_scale", "weight_offset"):
            loader = self.loader(weight_loader, name, FLOAT_DTYPES)
            data = torch.zeros(out, n_groups, dtype=torch.float32)
            int_weights.register_group_param(layer, name, data, loader, partition_groups)

    def _int_weight(self, layer) -> torch.Tensor:
        w = layer.weight.data
        if self.packed:  # along the output dim per group, the input dim per channel
            w = unpack_int4_pairs(w, dim=0 if self.group_size != -1 else 1)
        require_int_range(self.where("weight"), w, self.num_bits, self.label)
        return w

    def translate(self, layer):
        w = self._int_weight(layer)
        offset = layer.weight_offset.data.double() if loaded(layer, "weight_offset") else None
        symmetric = offset is None or bool((offset == 0).all())
        zp = None
        if not symmetric:
            lo, hi = -(1 << (self.num_bits - 1)), (1 << (self.num_bits - 1)) - 1
            if bool((offset != offset.round()).any() or (offset < lo).any() or (offset > hi).any()):
                raise CheckpointError(
                    f"{self.where('weight_offset')}: must hold integers in [{lo}, {hi}] for {self.label}"
                )
            # compressed-tensors layout: int32 words packed along the output dim
            zp = pack_to_int32(offset.to(torch.int8), self.num_bits, packed_dim=0)
        set_param(layer, "weight_packed", pack_to_int32(w, self.num_bits, packed_dim=1))
        set_param(layer, "weight_zero_point", zp)
        set_param(layer, "weight_g_idx", None)
        set_param(layer, "weight_shape", torch.tensor(layer.full_weight_shape, dtype=torch.int64))
        set_param(layer, "weight_scale", layer.weight_scale.data.to(layer.params_dtype))
        drop(layer, "weight", "weight_offset")
        return WNA16Scheme(
            self.layer_name,
            num_bits=self.num_bits,
            group_size=None if self.group_size == -1 else self.group_size,
            symmetric=symmetric,
            files=self.files,
            shards=self.shards,
        )
