"""Kernels built from another kernel of the platform: a layer rewritten once at load into a form
some other family's kernel serves exactly, so every platform's fast int8 and weight-only kernels
serve these layers too (the inner kernel is chosen by the same candidate lists)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import (
    Int8LinearSpec,
    IntDynamicSpec,
    LinearKernel,
    W4A8Spec,
    WeightOnlySpec,
)
from vllm_ptq_ascend.kernels.torch_generic import (
    TorchWeightOnlyKernel,
    drop_params,
    int8_weight_per_channel,
)

logger = logging.getLogger(__name__)

DYNAMIC_PER_CHANNEL_W8A8 = Int8LinearSpec(weight_per_channel=True, static_input=False, input_symmetric=True)


class _Composed(LinearKernel):
    inner: LinearKernel

    def choose_inner(self, spec) -> LinearKernel:
        from vllm_ptq_ascend import kernels  # the platform's candidates (lazy: the package chooses)

        self.inner = kernels.choose_kernel(replace(self.config, spec=spec))
        return self.inner

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self.inner.name})" if hasattr(self, "inner") else type(self).__name__

    @property
    def switches_on_tokens(self) -> bool:
        return hasattr(self, "inner") and self.inner.switches_on_tokens

    def apply(self, layer, x, bias):
        return self.inner.apply(layer, x, bias)


class PerChannelW4A8AsInt8Kernel(_Composed):
    """W4A8 with one scale per output channel: the int4 values held in int8 are an exact int8
    weight, so the layer is dynamic per-channel W8A8 and runs on the platform's int8 GEMM."""

    family = W4A8Spec

    @classmethod
    def can_implement(cls, config):
        if config.spec.group_size not in (-1, config.in_features):
            return (
                False,
                f"group size {config.spec.group_size}: only per-channel scales fold into an int8 GEMM",
            )
        return True, None

    def process_weights_after_loading(self, layer):
        int8_weight_per_channel(layer, 4)
        self.choose_inner(DYNAMIC_PER_CHANNEL_W8A8).process_weights_after_loading(layer)


class Int8ActivationsAsInt8Kernel(_Composed):
    """W4A8/W8A8 int with dynamic per-token int8 activations and no online transform: exactly
    dynamic per-channel W8A8 (the weights held one per int8)."""

    family = IntDynamicSpec

    @classmethod
    def can_implement(cls, config):
        spec: IntDynamicSpec = config.spec
        if spec.kronecker is not None:
            return False, "an online transform comes before the activations are quantized"
        if spec.act_bits != 8:
            return False, f"{spec.act_bits}-bit activations are not int8's grid"
        return True, None

    def process_weights_after_loading(self, layer):
        int8_weight_per_channel(layer, self.spec.weight_bits)
        self.choose_inner(DYNAMIC_PER_CHANNEL_W8A8).process_weights_after_loading(layer)


class W4A8AsWeightOnlyKernel(_Composed):
    """W4A8 per group through the platform's W4A16 kernels (vLLM's Machete / Marlin on CUDA), as
    stock vLLM serves llmcompressor's W4A8: the activations then stay in the model's dtype, a finer
    grid than the checkpoint's int8 one. Listed only where no int4 x int8 grouped kernel exists."""

    family = W4A8Spec

    @classmethod
    def can_implement(cls, config):
        from vllm_ptq_ascend import kernels

        spec = cls._weight_only(config)
        chosen, reasons = kernels.first_candidate(
            replace(config, spec=spec), exclude=(TorchWeightOnlyKernel,)
        )
        if chosen is None:
            return False, "no W4A16 kernel of this platform takes the layer (" + "; ".join(reasons) + ")"
        return True, None

    @staticmethod
    def _weight_only(config) -> WeightOnlySpec:
        return WeightOnlySpec(num_bits=4, group_size=config.spec.group_size, symmetric=True, has_g_idx=False)

    def process_weights_after_loading(self, layer):
        # imported here: this kernel runs only under vLLM, the portable ones also without it
        from vllm.model_executor.parameter import PackedvLLMParameter

        w_int = torch_ops.unpack_weight(layer, 4)
        packed = pack_to_int32(w_int, 4, packed_dim=1)
        # vLLM's WNA16 layout, as its CompressedTensorsWNA16 registers it: new data in the vLLM
        # parameters, whose layout attributes (input_dim, output_dim, packed_dim) vLLM's kernels read
        layer.weight_scale.data = layer.weight_scale.data.to(self.config.params_dtype)
        if isinstance(getattr(layer, "weight_packed", None), PackedvLLMParameter):  # pack-quantized
            layer.weight_packed.data = packed
        else:  # int-quantized: one int4 value per int8
            drop_params(layer, "weight", "weight_packed")
            layer.weight_packed = PackedvLLMParameter(
                data=packed,
                input_dim=1,
                output_dim=0,
                packed_dim=1,
                packed_factor=8,
                weight_loader=_loaded_already,
            )
        layer.weight_zero_point = layer.weight_g_idx = None
        self.choose_inner(self._weight_only(self.config)).process_weights_after_loading(layer)


class W4A8OnInt8GridKernel(W4A8AsWeightOnlyKernel):
    """W4A8 per group as the checkpoint says, without a float copy of the weight: each token
    quantized to int8 (vLLM's per-token convention), its grid values in the model dtype, then the
    platform's W4A16 kernel on the 4-bit weights (``cpu_gemm_wna16`` on CPU). No grouped int4 x int8
    GEMM exists there; the NPU runs per-group W4A8 the same way (``NpuW4A8AntiquantKernel``)."""

    @staticmethod
    def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token symmetric int8: (values, scale); a platform may use its own fused op."""
        return torch_ops.per_token_quant_int8(x)

    def apply(self, layer, x, bias):
        x_q, scale = self.quantize_int8(x)
        x = (x_q.to(torch.float32) * scale.reshape(-1, 1)).to(x.dtype)
        return self.inner.apply(layer, x, bias)


def _loaded_already(*args, **kwargs):
    raise RuntimeError("this parameter is built after loading")


class ActOrderKernel(_Composed):
    """GPTQ act-order: sorting the input channels by group makes the groups contiguous again, so
    the platform's grouped kernel serves ``x[:, perm] @ W[perm]``; groups that are not all
    ``group_size`` wide have no such layout and are dequantized once instead."""

    family = WeightOnlySpec

    @classmethod
    def can_implement(cls, config):
        if not config.spec.has_g_idx:
            return False, "no act-order g_idx"
        if config.spec.group_size == -1:
            return False, "act-order without groups"
        return True, None

    def process_weights_after_loading(self, layer):
        spec: WeightOnlySpec = self.spec
        g_idx = layer.weight_g_idx.data.to(torch.long)
        perm = torch.argsort(g_idx, stable=True)
        self.perm = None
        if not torch.equal(
            g_idx[perm], torch_ops.group_index(len(perm), spec.group_size, None).to(g_idx.device)
        ):
            logger.warning(
                "layer '%s': act-order groups are not all %d channels wide; the weight is dequantized once "
                "at load (no grouped kernel layout exists)",
                self.config.layer_name,
                spec.group_size,
            )
            self.inner = TorchWeightOnlyKernel(self.config)
            self.inner.process_weights_after_loading(layer)
            return
        w_int = torch_ops.unpack_weight(layer, spec.num_bits)[:, perm]
        drop_params(layer, "weight_g_idx")
        # new data in the same parameter: it keeps its layout attributes (input_dim, packed_dim),
        # which vLLM's kernels read
        layer.weight_packed.data = pack_to_int32(w_int, spec.num_bits, packed_dim=1)
        self.perm = perm
        self.choose_inner(replace(spec, has_g_idx=False)).process_weights_after_loading(layer)

    def apply(self, layer, x, bias):
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return self.inner.apply(layer, x, bias)
