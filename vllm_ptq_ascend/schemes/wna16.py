"""WNA16: int4 / int8 weights with float activations (GPTQ, AWQ, round-to-nearest).

Per-group (any group size dividing the input) or per-channel scales, symmetric
or with zero points (AWQ), and GPTQ act-order (``weight_g_idx``), which stock
vLLM 0.32 refuses. Tensors follow compressed-tensors' pack-quantized format:
``weight_packed`` int32 [out, in*bits/32], ``weight_scale`` [out, groups],
``weight_zero_point`` int32 packed along the output dim, ``weight_shape``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from vllm.model_executor.parameter import (
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from vllm_ptq_ascend.formats.plan import CT_FORMAT
from vllm_ptq_ascend.kernels import WeightOnlySpec
from vllm_ptq_ascend.schemes import int_weights
from vllm_ptq_ascend.schemes.base import LayerShape, PtqScheme
from vllm_ptq_ascend.validation import CheckpointError, TensorSpec

SUPPORTED_BITS = (4, 8)


class WNA16Scheme(PtqScheme):
    serves = ((CT_FORMAT, "WNA16"),)

    def __init__(
        self,
        layer_name: str,
        *,
        num_bits: int,
        group_size: int | None,
        symmetric: bool,
        act_order: bool = False,
        files: dict[str, str] | None = None,
        shards: list[str] | None = None,
    ):
        super().__init__(layer_name, files, shards)
        if num_bits not in SUPPORTED_BITS:
            raise CheckpointError(
                f"layer '{layer_name}': {num_bits}-bit weights are not supported "
                f"(supported: {SUPPORTED_BITS})"
            )
        self.spec = WeightOnlySpec(
            num_bits=num_bits,
            group_size=-1 if not group_size else int(group_size),
            symmetric=symmetric,
            has_g_idx=act_order,
        )
        names = ["weight_packed", "weight_scale", "weight_shape"]
        if not symmetric:
            names.append("weight_zero_point")
        if act_order:
            names.append("weight_g_idx")
        self.tensor_names = tuple(names)

    def describe(self) -> str:
        s = self.spec
        groups = "per-channel" if s.group_size == -1 else f"group {s.group_size}"
        extras = ("symmetric" if s.symmetric else "zero points") + (", act-order" if s.has_g_idx else "")
        return f"W{s.num_bits}A16 ({groups}, {extras})"

    def checkpoint_tensors(self, out_features, in_features):
        s = self.spec
        specs = int_weights.packed_weight_spec(s.num_bits, out_features, in_features)
        specs |= int_weights.group_scale_spec(self, s.group_size, out_features, in_features, s.has_g_idx)
        n_groups = specs["weight_scale"].shapes[0][1]
        if not s.symmetric:
            zp_rows = math.ceil(out_features * s.num_bits / 32)
            specs["weight_zero_point"] = TensorSpec((torch.int32,), ((zp_rows, n_groups),))
        if s.has_g_idx:
            specs["weight_g_idx"] = TensorSpec((torch.int32,), ((in_features,),))
        return specs

    def kernel_spec(self, shape):
        return self.spec

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        s = self.spec
        out_features = int_weights.setup_layer(layer, shape)
        n_groups, partition_groups = int_weights.group_layout(
            self, s.group_size, shape.input_size, shape.input_size_per_partition, s.has_g_idx
        )
        pack = Fraction(32, s.num_bits)
        int_weights.register_packed_weight(
            layer, self, s.num_bits, out_features, shape.input_size_per_partition, weight_loader
        )
        int_weights.register_group_scales(
            layer, self, out_features, n_groups, partition_groups, shape.params_dtype, weight_loader
        )
        if not s.symmetric:
            zp_args = dict(
                data=torch.zeros(math.ceil(out_features * s.num_bits / 32), n_groups, dtype=torch.int32),
                output_dim=0,
                packed_dim=0,
                packed_factor=pack,
                weight_loader=self.loader(weight_loader, "weight_zero_point", (torch.int32,)),
            )
            layer.register_parameter(
                "weight_zero_point",
                PackedvLLMParameter(input_dim=1, **zp_args)
                if partition_groups
                else PackedColumnParameter(**zp_args),
            )
        else:
            layer.register_parameter("weight_zero_point", None)
        if s.has_g_idx:
            layer.register_parameter(
                "weight_g_idx",
                RowvLLMParameter(
                    data=torch.empty(shape.input_size_per_partition, dtype=torch.int32),
                    input_dim=0,
                    weight_loader=self.loader(
                        self._same_g_idx_for_all_shards(weight_loader), "weight_g_idx", (torch.int32,)
                    ),
                ),
            )
        int_weights.register_weight_shape(layer, self, weight_loader)
        self.choose_kernel(shape)

    def _same_g_idx_for_all_shards(self, inner):
        """Fused shards (q/k/v, gate/up) share an input and so one g_idx; refuse any that differ."""

        def load(param, loaded_weight, *args, **kwargs):
            before = param.data.clone() if getattr(param, "ptq_loaded_shards", None) else None
            result = inner(param, loaded_weight, *args, **kwargs)
            if before is not None and not torch.equal(before, param.data):
                raise CheckpointError(
                    f"{self.where('weight_g_idx')}: the shards of this fused "
                    "layer have different act-order g_idx; they read one input and must share it"
                )
            return result

        return load

    def validate_loaded(self, layer):
        int_weights.validate_scales_and_shape(self, layer)
        if self.spec.has_g_idx:
            g = layer.weight_g_idx.data
            n_groups = layer.weight_scale.shape[1]
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_groups):
                raise CheckpointError(
                    f"{self.where('weight_g_idx')}: group indices must "
                    f"lie in [0, {n_groups}), found [{int(g.min())}, {int(g.max())}]"
                )

    def prepare(self, layer):
        super().prepare(layer)
        layer.weight_shape = None
