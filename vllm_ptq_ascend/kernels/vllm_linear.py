"""vLLM's own linear kernels, chosen by vLLM's own selection for the current platform.

Our W8A8 and W4A16/W8A16 layers hold exactly the tensors vLLM's compressed-tensors schemes hold
(same names, parameter classes and layouts), so vLLM's ``init_int8_linear_kernel`` candidates
(``_POSSIBLE_INT8_KERNELS``: cutlass, Triton, AITER, ...) and ``choose_mp_linear_kernel``'s
(``_POSSIBLE_KERNELS``: Machete, Marlin, Exllama, CPUWNA16, ...) serve them unchanged. These two
adapters ask vLLM which of its kernels takes the layer and pass vLLM's reasons on when none does.
"""

from __future__ import annotations

import torch

from vllm_ptq_ascend.kernels.base import Int8LinearSpec, KernelConfig, LinearKernel, WeightOnlySpec

INT8_PARAM_NAMES = ("weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj")


def _one_line(reasons: str) -> str:
    return "; ".join(r.strip() for r in reasons.splitlines() if r.strip() and not r.startswith("Failed"))


class _VllmKernel(LinearKernel):
    """One of vLLM's kernels, chosen by vLLM's selection (``vllm_kernel``) and built once loaded."""

    vllm = None

    @classmethod
    def vllm_kernel(cls, config: KernelConfig) -> tuple[type | None, str | None]:
        raise NotImplementedError

    def build(self, kernel_type: type):
        """vLLM's kernel object of ``kernel_type`` for this layer."""
        raise NotImplementedError

    @classmethod
    def refusal(cls, config: KernelConfig) -> str | None:
        """Why no vLLM kernel of this kind can take the layer, before vLLM is asked (or None)."""
        return None

    @classmethod
    def can_implement(cls, config):
        why = cls.refusal(config)
        if why:
            return False, why
        kernel, why = cls.vllm_kernel(config)
        return kernel is not None, why

    def process_weights_after_loading(self, layer):
        kernel_type, _ = self.vllm_kernel(self.config)
        self.vllm = self.build(kernel_type)
        self.vllm.process_weights_after_loading(layer)

    @property
    def name(self) -> str:
        own = type(self).__name__
        return own if self.vllm is None else f"{own}({type(self.vllm).__name__})"

    def apply(self, layer, x, bias):
        return self.vllm.apply_weights(layer, x, bias)


class VllmInt8Kernel(_VllmKernel):
    """W8A8 int8 through ``choose_scaled_mm_linear_kernel(..., _POSSIBLE_INT8_KERNELS)``."""

    family = Int8LinearSpec

    @staticmethod
    def vllm_config(config: KernelConfig):
        from vllm.model_executor.kernels.linear import Int8ScaledMMLinearLayerConfig

        spec: Int8LinearSpec = config.spec
        return Int8ScaledMMLinearLayerConfig(
            is_channelwise=spec.weight_per_channel,
            is_static_input_scheme=spec.static_input,
            input_symmetric=spec.input_symmetric,
        )

    @classmethod
    def vllm_kernel(cls, config: KernelConfig) -> tuple[type | None, str | None]:
        from vllm.model_executor.kernels import linear

        try:
            return linear.choose_scaled_mm_linear_kernel(
                cls.vllm_config(config), linear._POSSIBLE_INT8_KERNELS, quantization="int8_w8a8"
            ), None
        except ValueError as e:
            return None, "vLLM has no int8 kernel for it here (" + _one_line(str(e)) + ")"

    @classmethod
    def refusal(cls, config):
        return "vLLM's int8 kernels quantize their own input" if config.spec.quantized_input else None

    def build(self, kernel_type):
        return kernel_type(self.vllm_config(self.config), layer_param_names=list(INT8_PARAM_NAMES))


class VllmMixedPrecisionKernel(_VllmKernel):
    """W4A16 / W8A16 through ``choose_mp_linear_kernel`` (``MPLinearLayerConfig``, as vLLM's
    CompressedTensorsWNA16 builds it). vLLM's config has no act-order: ``ActOrderKernel`` permutes
    such layers first."""

    family = WeightOnlySpec

    @staticmethod
    def vllm_config(config: KernelConfig):
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig
        from vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16 import (  # noqa: E501
            WNA16_SUPPORTED_TYPES_MAP,
            WNA16_ZP_SUPPORTED_TYPES_MAP,
        )

        spec: WeightOnlySpec = config.spec
        types = WNA16_SUPPORTED_TYPES_MAP if spec.symmetric else WNA16_ZP_SUPPORTED_TYPES_MAP
        shape = config.shape
        return MPLinearLayerConfig(
            full_weight_shape=(shape.input_size, shape.output_size),
            partition_weight_shape=(shape.input_size_per_partition, shape.out_features),
            weight_type=types[spec.num_bits],
            act_type=shape.params_dtype,
            group_size=spec.group_size,
            zero_points=not spec.symmetric,
        )

    @classmethod
    def vllm_kernel(cls, config: KernelConfig) -> tuple[type | None, str | None]:
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

        try:
            return choose_mp_linear_kernel(cls.vllm_config(config)), None
        except ValueError as e:
            return None, "vLLM has no mixed-precision kernel for it here (" + _one_line(str(e)) + ")"

    @classmethod
    def refusal(cls, config):
        return "vLLM's MPLinearLayerConfig has no act-order g_idx" if config.spec.has_g_idx else None

    def build(self, kernel_type):
        return kernel_type(
            self.vllm_config(self.config),
            w_q_param_name="weight_packed",
            w_s_param_name="weight_scale",
            w_zp_param_name="weight_zero_point",
        )


def default_dtype(dtype: torch.dtype):
    """vLLM's CPU oneDNN handle takes its output dtype from the default dtype (as the engine sets it)."""
    from vllm.utils.torch_utils import set_default_torch_dtype

    return set_default_torch_dtype(dtype)
