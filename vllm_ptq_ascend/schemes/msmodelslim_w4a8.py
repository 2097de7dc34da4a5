"""msModelSlim ``W4A8_DYNAMIC`` dense linear layers -> our W4A8 scheme (schemes/w4a8_int.py).

The upstream sources it follows and the layouts in detail: ``docs/sources.md``.
"""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import (
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from vllm_ptq_ascend.formats.msmodelslim import LEGACY_VERSIONS, PACKED_VERSION
from vllm_ptq_ascend.formats.plan import MODELSLIM_FORMAT
from vllm_ptq_ascend.schemes import int_weights
from vllm_ptq_ascend.schemes.base import LayerShape
from vllm_ptq_ascend.schemes.msmodelslim_common import _ModelSlimScheme, drop, set_param, unpack_int4_pairs
from vllm_ptq_ascend.schemes.w4a8_int import W4A8IntScheme
from vllm_ptq_ascend.validation import (
    FLOAT_DTYPES,
    CheckpointError,
    TensorSpec,
    require_int_range,
    require_positive_finite,
)

LABEL = "W4A8_DYNAMIC"
VERSIONS = (*LEGACY_VERSIONS, PACKED_VERSION)
ROW_SCALE_BIAS_COLS = 16  # process_scale(name, bias, 16)
OFFSET_DTYPES = (*FLOAT_DTYPES, torch.int64, torch.int32, torch.int8)
# scale_bias against 8 * sum(q * s2 * s1): the legacy saver rounds s1, s2 to bfloat16 (relative
# 2^-9 each); relative to 8 * sum|q * s2 * s1|, so cancelling sums cannot make it fail spuriously.
SCALE_BIAS_RTOL = 1e-2


def check_version(version: str, layer: str, where: str) -> None:
    if version not in VERSIONS:
        raise CheckpointError(
            f"{where}: layer '{layer}' has label {LABEL!r} with description version {version!r}, "
            f"which ptq_ascend does not serve (served: no version or '0' for the unpacked layout, "
            f"'{PACKED_VERSION}' for the packed one)"
        )


class ModelSlimW4A8Dynamic(_ModelSlimScheme):
    """msModelSlim W4A8_DYNAMIC -> W4A8IntScheme (int4 symmetric weights, int8 per-token activations)."""

    serves = ((MODELSLIM_FORMAT, "W4A8_DYNAMIC"),)

    label = LABEL

    def __init__(
        self,
        layer_name: str,
        *,
        group_size: int,
        version: str,
        files=None,
        shards=None,
        row_parallel: bool | None = None,
    ):
        super().__init__(layer_name, files, shards)
        check_version(version, layer_name, "quant_model_description.json")
        self.version = version
        self.packed = version == PACKED_VERSION
        if not group_size and not self.packed:
            raise CheckpointError(
                f"quant_model_description.json: layer '{layer_name}' has label {LABEL!r} per channel "
                f"(group_size 0) with description version {version!r}: only version '{PACKED_VERSION}' "
                "has a per-channel W4A8_DYNAMIC layout"
            )
        self.group_size = group_size or -1
        # None: decided from the layer in create_weights (vLLM's RowParallelLinear)
        self.row_parallel = row_parallel
        self.tensor_names = (
            ("weight", "weight_scale")
            + (("weight_scale_second",) if self.per_group else ())
            + (("scale_bias",) if self.packed else ())
        )

    @property
    def per_group(self) -> bool:
        return self.group_size != -1

    def packed_dim(self) -> int | None:
        """Version 1.0.0 packs int4 pairs along the output dim (``inspect`` sizes the layer from it)."""
        return 0 if self.packed else None

    def describe(self) -> str:
        inner = f" -> {self.inner.describe()}" if self.inner is not None else ""
        return f"msModelSlim {self.label} (version {self.version}){inner}"

    def checkpoint_tensors(self, out_features, in_features):
        channel = ((out_features, 1),)
        weight = (out_features // 2, in_features) if self.packed else (out_features, in_features)
        specs = {
            "weight": TensorSpec((torch.int8,), (weight,)),
            "weight_scale": TensorSpec(FLOAT_DTYPES, channel, scale=True),
            "weight_offset": TensorSpec(OFFSET_DTYPES, channel, required=False),
        }
        if self.per_group:
            n_groups, _ = int_weights.group_layout(self, self.group_size, in_features, in_features)
            groups = ((out_features, n_groups),)
            specs["weight_scale_second"] = TensorSpec(FLOAT_DTYPES, groups, scale=True)
            specs["weight_offset_second"] = TensorSpec(OFFSET_DTYPES, groups, required=False)
        if self.packed:
            specs["scale_bias"] = TensorSpec(
                FLOAT_DTYPES, ((out_features, 1), (out_features, ROW_SCALE_BIAS_COLS))
            )
        return specs

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        out = int_weights.setup_layer(layer, shape)
        self.shape = shape
        w_loader = self.loader(weight_loader, "weight", (torch.int8,))
        if self.packed:  # two int4 per int8 along the output dim: every fused shard must be even
            if any(w % 2 for w in shape.output_partition_sizes):
                raise CheckpointError(
                    f"{self.where('weight')}: packed int4 pairs along the output dim need even output "
                    f"sizes, got {list(shape.output_partition_sizes)}"
                )
            layer.register_parameter(
                "weight",
                PackedvLLMParameter(
                    data=torch.empty(out // 2, shape.input_size_per_partition, dtype=torch.int8),
                    input_dim=1,
                    output_dim=0,
                    packed_dim=0,
                    packed_factor=2,
                    weight_loader=w_loader,
                ),
            )
        else:
            int_weights.register_int8_weight(layer, self, out, shape.input_size_per_partition, weight_loader)
        self._channel_param(layer, "weight_scale", out, FLOAT_DTYPES, weight_loader)
        self._channel_param(layer, "weight_offset", out, OFFSET_DTYPES, weight_loader)
        if self.per_group:
            n_groups, partition_groups = int_weights.group_layout(
                self, self.group_size, shape.input_size, shape.input_size_per_partition
            )
            full_groups = shape.input_size // self.group_size
            for name, dtypes in (
                ("weight_scale_second", FLOAT_DTYPES),
                ("weight_offset_second", OFFSET_DTYPES),
            ):
                loader = self.loader(self._columns(weight_loader, name, full_groups), name, dtypes)
                data = torch.zeros(out, n_groups, dtype=torch.float32)
                int_weights.register_group_param(layer, name, data, loader, partition_groups)
        if self.packed:
            self._register_scale_bias(layer, out, shape, weight_loader)

    def _register_scale_bias(self, layer, out, shape: LayerShape, weight_loader):
        input_size, input_size_per_partition = shape.input_size, shape.input_size_per_partition
        row = self.row_parallel
        if row is None:
            from vllm.model_executor.layers.linear import RowParallelLinear

            row = isinstance(layer, RowParallelLinear)
        if not row:
            self._channel_param(layer, "scale_bias", out, FLOAT_DTYPES, weight_loader)
            return
        tp = input_size // input_size_per_partition
        if ROW_SCALE_BIAS_COLS % tp or input_size % ROW_SCALE_BIAS_COLS:
            raise CheckpointError(
                f"{self.where('scale_bias')}: a row-parallel layer's {ROW_SCALE_BIAS_COLS} scale_bias "
                f"columns (input slices) cannot be split over {tp} ranks of input size {input_size}"
            )
        # each rank holds the columns of its input slices (split along the input, as the weight)
        layer.register_parameter(
            "scale_bias",
            GroupQuantScaleParameter(
                data=torch.zeros(out, ROW_SCALE_BIAS_COLS // tp, dtype=torch.float32),
                output_dim=0,
                input_dim=1,
                weight_loader=self.loader(
                    self._columns(weight_loader, "scale_bias", ROW_SCALE_BIAS_COLS),
                    "scale_bias",
                    FLOAT_DTYPES,
                ),
            ),
        )

    def _columns(self, inner, name: str, cols: int):
        """vLLM's row-parallel loader narrows dim 1 to this rank's part without checking the
        checkpoint's full width (a wider tensor loads silently): check it first."""

        def load(param, loaded_weight, *args, **kwargs):
            if loaded_weight.dim() != 2 or loaded_weight.shape[1] != cols:
                raise CheckpointError(
                    f"{self.where(name)}: shape {tuple(loaded_weight.shape)} does not fit the layer "
                    f"({cols} columns expected)"
                )
            return inner(param, loaded_weight, *args, **kwargs)

        return load

    def _int_weight(self, layer) -> torch.Tensor:
        w = layer.weight.data
        if self.packed:
            return unpack_int4_pairs(w, dim=0)  # [out/2, in]: pairs of rows
        what = f"{LABEL} (one int4 per int8 in version {self.version!r})"
        require_int_range(self.where("weight"), w, 4, what)
        return w

    def _check_scale_bias(self, layer, deq: torch.Tensor) -> None:
        sb = layer.scale_bias.data.double()
        out, in_f = deq.shape
        cols = sb.shape[1]
        if sb.shape[0] != out or in_f % cols:
            raise CheckpointError(
                f"{self.where('scale_bias')}: shape {tuple(sb.shape)} does not fit a weight of "
                f"{tuple(deq.shape)}"
            )
        parts = deq.reshape(out, cols, in_f // cols)
        expected = 8 * parts.sum(-1)
        bad = (sb - expected).abs() > SCALE_BIAS_RTOL * 8 * parts.abs().sum(-1) + 1e-12
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise CheckpointError(
                f"{self.where('scale_bias')}: disagrees with 8 * sum(weight * weight_scale_second * "
                f"weight_scale) over the input{'' if cols == 1 else f' slices ({cols} columns)'} in "
                f"{int(bad.sum())} place(s) (first: row {r}, column {c}: {sb[r, c].item():.6g} vs "
                f"{expected[r, c].item():.6g})"
            )

    def translate(self, layer):
        q = self._int_weight(layer)
        self._require_zero(layer, "weight_offset")
        s1 = layer.weight_scale.data
        require_positive_finite(self.layer_name, "weight_scale", s1, self.files, self.shards)
        scale = s1.double().reshape(-1, 1)
        if self.per_group:
            self._require_zero(layer, "weight_offset_second")
            s2 = layer.weight_scale_second.data
            require_positive_finite(self.layer_name, "weight_scale_second", s2, self.files, self.shards)
            scale = scale * s2.double()
        if self.packed:
            g = q.shape[1] // scale.shape[1]
            self._check_scale_bias(layer, q.double() * scale.repeat_interleave(g, 1))
        set_param(layer, "weight", q.contiguous())
        set_param(layer, "weight_scale", scale.float())
        drop(layer, "weight_offset", "weight_scale_second", "weight_offset_second", "scale_bias")
        return W4A8IntScheme(
            self.layer_name,
            group_size=self.group_size if self.per_group else None,
            packed=False,
            files=self.files,
            shards=self.shards,
        )
