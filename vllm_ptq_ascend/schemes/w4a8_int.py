"""W4A8 int: symmetric int4 weights (per group or per channel), int8 per-token dynamic activations.

What llmcompressor's ``W4A8`` preset writes. Both compressed-tensors formats are served:
``int-quantized`` (``weight`` int8 [out, in] holding values in [-8, 7]) and
``pack-quantized`` (``weight_packed`` int32 [out, in/8] plus ``weight_shape``, as WNA16);
``weight_scale`` is [out, groups] in both. The weight tensors and group scales are
registered by the helpers WNA16 uses (schemes/int_weights.py).
"""

from __future__ import annotations

import torch

from vllm_ptq_ascend.formats.plan import CT_FORMAT
from vllm_ptq_ascend.kernels import W4A8Spec
from vllm_ptq_ascend.schemes import int_weights
from vllm_ptq_ascend.schemes.base import LayerShape, PtqScheme


class W4A8IntScheme(PtqScheme):
    serves = ((CT_FORMAT, "W4A8"),)

    weight_bits = 4

    def __init__(
        self,
        layer_name: str,
        *,
        group_size: int | None,
        packed: bool,
        files: dict[str, str] | None = None,
        shards: list[str] | None = None,
    ):
        super().__init__(layer_name, files, shards)
        self.spec = W4A8Spec(group_size=-1 if not group_size else int(group_size))
        self.packed = packed
        self.tensor_names = (
            ("weight_packed", "weight_scale", "weight_shape") if packed else ("weight", "weight_scale")
        )

    def describe(self) -> str:
        groups = "per-channel" if self.spec.group_size == -1 else f"group {self.spec.group_size}"
        fmt = "pack-quantized" if self.packed else "int-quantized"
        return f"W4A8 int (int4 symmetric {groups} weights, {fmt}; int8 dynamic per-token activations)"

    def checkpoint_tensors(self, out_features, in_features):
        weight = (
            int_weights.packed_weight_spec(self.weight_bits, out_features, in_features)
            if self.packed
            else int_weights.int8_weight_spec(out_features, in_features)
        )
        return weight | int_weights.group_scale_spec(self, self.spec.group_size, out_features, in_features)

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        out_features = int_weights.setup_layer(layer, shape)
        n_groups, partition_groups = int_weights.group_layout(
            self, self.spec.group_size, shape.input_size, shape.input_size_per_partition
        )
        if self.packed:
            int_weights.register_packed_weight(
                layer, self, self.weight_bits, out_features, shape.input_size_per_partition, weight_loader
            )
            int_weights.register_weight_shape(layer, self, weight_loader)
        else:
            int_weights.register_int8_weight(
                layer, self, out_features, shape.input_size_per_partition, weight_loader
            )
        # float32 scales whatever the model dtype: the output is dequantized in float32 anyway,
        # and float32 checkpoint scales are then used as written.
        int_weights.register_group_scales(
            layer, self, out_features, n_groups, partition_groups, torch.float32, weight_loader
        )

    def validate_loaded(self, layer):
        int_weights.validate_scales_and_shape(self, layer)
        int_weights.validate_int_range(self, layer, self.weight_bits)

    def prepare(self, layer):
        self.kernels.prepare_w4a8(layer, self.spec)

    def apply_weights(self, layer, x, bias=None):
        kernels = self.kernels
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_scale, _ = kernels.quant_act_int8(layer, x2)
        out = kernels.w4a8_mm(layer, x_q, x_scale, bias, x.dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])
