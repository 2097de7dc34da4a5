"""CPU backend: vLLM-CPU's own oneDNN int8 GEMM and WNA16 kernels, torch where they do not apply."""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops  # this module is imported only on vLLM's CPU platform

from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact
from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import Int8LinearSpec, WeightOnlySpec
from vllm_ptq_ascend.kernels.torch_generic import TorchBackend, drop_params

_INT8_PARAM_NAMES = ("weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj")
# oneDNN's int8 GEMM saturates without VNNI/AMX (measured on an AVX2-only EPYC: 1.5-2.7% relative
# error per W8A8 layer with full-range int8 weights), so those CPUs get torch's exact int8 path.


def wna16_kernel_available() -> bool:
    """vLLM-CPU builds cpu_gemm_wna16 only into its AVX-512 BF16 library (``vllm._C``): its AVX2 and
    plain AVX-512 libraries, loaded on such CPUs, lack it (the AVX2-only CI host)."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # loads this CPU's library once; the engine has done so already
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def _wna16_kernel_fits(layer: torch.nn.Module, spec: WeightOnlySpec) -> bool:
    """The shapes and types vLLM-CPU's cpu_gemm_wna16 accepts (see CPUWNA16LinearKernel)."""
    return (
        wna16_kernel_available()
        and spec.num_bits == 4
        and layer.input_size_per_partition % 32 == 0
        and layer.output_size_per_partition % 32 == 0
        and (spec.group_size == -1 or spec.group_size % 2 == 0)
        and layer.params_dtype in (torch.bfloat16, torch.float16)  # no fp32 kernel
    )


class CpuBackend(TorchBackend):
    """vLLM-CPU's kernels where they apply; the portable torch paths otherwise."""

    name = "cpu"

    def __init__(self, exact_int8: bool | None = None) -> None:
        self.onednn_int8 = onednn_int8_is_exact() if exact_int8 is None else exact_int8

    # -- W8A8: reuse vLLM's oneDNN kernel for the layout, call its ops directly --
    def prepare_int8(self, layer: torch.nn.Module, spec: Int8LinearSpec) -> None:
        layer.ptq_dnnl = None
        if not self.onednn_int8:  # it would saturate on this CPU: torch's exact int8 GEMM
            return super().prepare_int8(layer, spec)
        from vllm.model_executor.kernels.linear.scaled_mm.cpu import (
            CPUInt8ScaledMMLinearKernel,
        )
        from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
            Int8ScaledMMLinearLayerConfig,
        )
        from vllm.utils.torch_utils import set_default_torch_dtype

        config = Int8ScaledMMLinearLayerConfig(
            is_static_input_scheme=spec.static_input,
            is_channelwise=spec.weight_per_channel,
            input_symmetric=spec.input_symmetric,
        )
        kernel = CPUInt8ScaledMMLinearKernel(config, _INT8_PARAM_NAMES)
        # The oneDNN handle takes its output dtype from the default dtype.
        with set_default_torch_dtype(layer.params_dtype):
            kernel.process_weights_for_onednn(layer)
        layer.ptq_dnnl = kernel.dnnl_handler
        layer.ptq_input_symmetric = spec.input_symmetric

    def quant_act_int8(self, layer, x):
        if getattr(layer, "ptq_dnnl", None) is None:
            return super().quant_act_int8(layer, x)
        return ops.onednn_scaled_int8_quant(
            x, layer.input_scale, layer.input_zero_point, layer.ptq_input_symmetric
        )

    def int8_mm(self, layer, x_q, x_scale, x_zp, bias, out_dtype):
        if getattr(layer, "ptq_dnnl", None) is None:
            return super().int8_mm(layer, x_q, x_scale, x_zp, bias, out_dtype)
        out = torch.empty((x_q.shape[0], layer.ptq_dnnl.n), dtype=out_dtype)
        ops.onednn_scaled_mm(layer.ptq_dnnl, x_q, out, x_scale, x_zp, layer.azp_adj, bias)
        return out

    # -- W4A8: per-channel layers run on the oneDNN int8 GEMM above (TorchBackend.prepare_w4a8
    # hands them to prepare_int8: int4 values in int8 are exact). Per-group layers use one
    # float32 GEMM on the weight dequantized once (torch_ops.int8_x_dequantized_mm): oneDNN
    # takes only per-channel weight scales, and the kernel stock vLLM-CPU picks for W4A8
    # (Dynamic4bitLinearKernel) is KleidiAI on Arm; on x86 it is torch's reference fallback,
    # which quantizes activations per row *asymmetrically*, not as the checkpoint says.
    def use_dynamic_per_token_input(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "ptq_dnnl", None) is None:
            return super().use_dynamic_per_token_input(layer)
        layer.input_scale = layer.input_zero_point = None
        layer.ptq_input_symmetric = True

    # -- W4A16 / W8A16 --------------------------------------------------------
    def prepare_weight_only(self, layer: torch.nn.Module, spec: WeightOnlySpec) -> None:
        if not _wna16_kernel_fits(layer, spec):
            return self.dequantize_once(layer, spec)
        w_int = torch_ops.unpack_weight(layer, spec.num_bits)  # [out, in], signed
        layer.ptq_perm = None
        if spec.has_g_idx:
            # Act-order: sorting input channels by group makes groups contiguous again,
            # so the grouped kernel applies to x[:, perm] @ W[perm].
            g_idx = layer.weight_g_idx.data.to(torch.long)
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch_ops.group_index(len(perm), spec.group_size, None)):
                return self.dequantize_once(layer, spec)  # irregular groups: no kernel layout
            w_int, layer.ptq_perm = w_int[:, perm], perm
        zp = torch_ops.unpack_zero_point(layer, spec.num_bits)
        self._pack_for_cpu_gemm_wna16(layer, w_int, zp, spec)
        layer.ptq_fast = True
        drop_params(layer, "weight_packed", "weight_zero_point", "weight_g_idx", "weight_scale")

    def _pack_for_cpu_gemm_wna16(self, layer, w_int, zp, spec) -> None:
        """The layout CPUWNA16LinearKernel builds: [in, out] packed along out, 16-column blocks."""
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import _get_isa_hint
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            pack_quantized_values_into_int32,
        )
        from vllm.scalar_type import scalar_types

        offset = 1 << (spec.num_bits - 1)  # checkpoint stores q + 8 as unsigned nibbles
        unsigned = (w_int.to(torch.int32) + offset).t().contiguous()  # [in, out]
        in_features = unsigned.shape[0]
        packed = pack_quantized_values_into_int32(unsigned, scalar_types.uint4b8, 1)
        pack_factor = 32 // spec.num_bits
        layer.ptq_qweight = (
            packed.view(in_features, -1, 16 // pack_factor)
            .permute(1, 0, 2)
            .reshape(-1, in_features * 16 // pack_factor)
            .contiguous()
        )
        layer.ptq_scales = layer.weight_scale.data.t().contiguous().to(layer.params_dtype)
        layer.ptq_zeros = None
        if zp is not None:
            zp_unsigned = (zp.to(torch.int32) + offset).t().contiguous()  # [groups, out]
            layer.ptq_zeros = pack_quantized_values_into_int32(
                zp_unsigned, scalar_types.uint4, 1
            ).contiguous()
        layer.ptq_isa_hint = _get_isa_hint(layer.params_dtype)

    def weight_only_mm(self, layer, x, bias):
        if not layer.ptq_fast:
            return super().weight_only_mm(layer, x, bias)
        if layer.ptq_perm is not None:
            x = x[..., layer.ptq_perm]
        return ops.cpu_gemm_wna16(
            input=x.contiguous(),
            q_weight=layer.ptq_qweight,
            scales=layer.ptq_scales,
            zeros=layer.ptq_zeros,
            bias=bias,
            pack_factor=32 // 4,
            isa_hint=layer.ptq_isa_hint,
        )
