"""msModelSlim W8A8 (static, zero-point activations) and W8A8_DYNAMIC -> W8A8Int8Scheme."""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import ChannelQuantScaleParameter, PerTensorScaleParameter

from vllm_ptq_ascend.formats.plan import MODELSLIM_FORMAT
from vllm_ptq_ascend.schemes import int_weights
from vllm_ptq_ascend.schemes.base import LayerShape
from vllm_ptq_ascend.schemes.msmodelslim_common import (
    _ModelSlimScheme,
    drop,
    int64_bits_as_float32,
    loaded,
    set_param,
)
from vllm_ptq_ascend.schemes.w8a8_int8 import W8A8Int8Scheme
from vllm_ptq_ascend.validation import FLOAT_DTYPES, CheckpointError, TensorSpec

# relative tolerance of deq_scale against input_scale * weight_scale: both are written in
# float32 from the same float32 scales (ascendv1.py), so they agree to a few ulp; 1e-2 also
# admits scales stored in bfloat16 by older tools and still catches any real disagreement.
DEQ_SCALE_RTOL = 1e-2


class ModelSlimW8A8Dynamic(_ModelSlimScheme):
    serves = ((MODELSLIM_FORMAT, "W8A8_DYNAMIC"),)

    label = "W8A8_DYNAMIC"
    tensor_names = ("weight", "weight_scale")

    def checkpoint_tensors(self, out_features, in_features):
        channel = ((out_features, 1),)
        return int_weights.int8_weight_spec(out_features, in_features) | {
            "weight_scale": TensorSpec(FLOAT_DTYPES, channel, scale=True),
            "weight_offset": TensorSpec(FLOAT_DTYPES, channel, required=False),
        }

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        out = int_weights.setup_layer(layer, shape)
        self.shape = shape
        int_weights.register_int8_weight(layer, self, out, shape.input_size_per_partition, weight_loader)
        self._channel_param(layer, "weight_scale", out, FLOAT_DTYPES, weight_loader)
        self._channel_param(layer, "weight_offset", out, FLOAT_DTYPES, weight_loader)

    def translate(self, layer):
        self._require_zero(layer, "weight_offset")
        drop(layer, "weight_offset")
        set_param(layer, "input_scale", None)
        set_param(layer, "input_zero_point", None)
        set_param(layer, "azp_adj", None)
        return W8A8Int8Scheme(
            self.layer_name, weight_per_channel=True, static_input=False, files=self.files, shards=self.shards
        )


class ModelSlimW8A8(_ModelSlimScheme):
    serves = ((MODELSLIM_FORMAT, "W8A8"),)

    label = "W8A8"
    tensor_names = ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias")

    def checkpoint_tensors(self, out_features, in_features):
        channel, per_tensor = ((out_features, 1),), ((1,), ())
        return int_weights.int8_weight_spec(out_features, in_features) | {
            "input_scale": TensorSpec(FLOAT_DTYPES, per_tensor, scale=True),
            "input_offset": TensorSpec((*FLOAT_DTYPES, torch.int8, torch.int32), per_tensor),
            # int64: float32 bit patterns (int64_bits_as_float32)
            "deq_scale": TensorSpec((*FLOAT_DTYPES, torch.int64), ((out_features,),), scale=True),
            "quant_bias": TensorSpec((torch.int32,), ((out_features,),)),
            "weight_scale": TensorSpec(FLOAT_DTYPES, channel, required=False, scale=True),
            "weight_offset": TensorSpec(FLOAT_DTYPES, channel, required=False),
        }

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        out = int_weights.setup_layer(layer, shape)
        self.shape = shape
        n_shards = len(shape.output_partition_sizes)
        int_weights.register_int8_weight(layer, self, out, shape.input_size_per_partition, weight_loader)
        # optional: the ascendV1 saver writes no weight_scale/weight_offset for W8A8
        self._channel_param(layer, "weight_scale", out, FLOAT_DTYPES, weight_loader)
        self._channel_param(layer, "weight_offset", out, FLOAT_DTYPES, weight_loader)
        self._channel_param(layer, "quant_bias", out, (torch.int32,), weight_loader, torch.int64, cols=0)
        layer.register_parameter(
            "deq_scale",
            ChannelQuantScaleParameter(
                data=torch.zeros(out, dtype=torch.float32),
                output_dim=0,
                weight_loader=self.loader(
                    int64_bits_as_float32(weight_loader), "deq_scale", (*FLOAT_DTYPES, torch.int64)
                ),
            ),
        )
        for name, dtypes in (
            ("input_scale", FLOAT_DTYPES),
            ("input_offset", (*FLOAT_DTYPES, torch.int8, torch.int32)),
        ):
            layer.register_parameter(
                name,
                PerTensorScaleParameter(
                    data=torch.zeros(n_shards, dtype=torch.float32),
                    weight_loader=self.loader(weight_loader, name, dtypes),
                ),
            )

    def translate(self, layer):
        offset = layer.input_offset.data.double()
        if bool((offset != offset.round()).any() or (offset < -128).any() or (offset > 127).any()):
            raise CheckpointError(
                f"{self.where('input_offset')}: must hold integers in [-128, 127], found {offset.tolist()}"
            )
        self._require_zero(layer, "weight_offset")
        widths = torch.tensor(layer.logical_widths)
        in_scale = torch.repeat_interleave(layer.input_scale.data.double(), widths)  # per output row
        in_zp = torch.repeat_interleave(offset, widths)
        deq = layer.deq_scale.data.double()
        if loaded(layer, "weight_scale"):
            w_scale = layer.weight_scale.data.double().reshape(-1)
            expected = in_scale * w_scale
            bad = (deq - expected).abs() > DEQ_SCALE_RTOL * expected.abs()
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise CheckpointError(
                    f"{self.where('deq_scale')}: disagrees with input_scale * weight_scale in "
                    f"{int(bad.sum())} channel(s) (first: channel {i}, deq_scale {deq[i].item():.6g}, "
                    f"input_scale * weight_scale {expected[i].item():.6g})"
                )
        else:  # derived: the NPU runs on deq_scale alone
            w_scale = deq / in_scale
        # quant_bias = round(bias / deq_scale - rowsum(weight) * input_offset) (ascendv1.py
        # on_w8a8_static). Row-parallel ranks hold part of each row: checked without TP split only.
        if layer.input_size_per_partition == layer.full_weight_shape[1]:
            bias = getattr(layer, "bias", None)
            fp_bias = bias.data.double() if bias is not None else torch.zeros_like(deq)
            rowsum = layer.weight.data.double().sum(1)
            expected = torch.round(fp_bias / deq - rowsum * in_zp)
            bad = (layer.quant_bias.data.double() - expected).abs() > 1 + 1e-6 * expected.abs()
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise CheckpointError(
                    f"{self.where('quant_bias')}: disagrees with round(bias / deq_scale - "
                    f"rowsum(weight) * input_offset) in {int(bad.sum())} channel(s) (first: channel {i}, "
                    f"{int(layer.quant_bias.data[i])} vs {int(expected[i])})"
                )
        symmetric = bool((offset == 0).all())
        set_param(layer, "weight_scale", w_scale.float().reshape(-1, 1))
        set_param(layer, "input_zero_point", None if symmetric else offset.to(torch.int8))
        set_param(layer, "azp_adj", None)
        drop(layer, "weight_offset", "input_offset", "deq_scale", "quant_bias")
        return W8A8Int8Scheme(
            self.layer_name,
            weight_per_channel=True,
            static_input=True,
            input_symmetric=symmetric,
            files=self.files,
            shards=self.shards,
        )
