"""Ascend NPU kernels: torch_npu's quantized matmuls, called the way vLLM-Ascend calls them.

Every kernel here needs an Atlas A2/A3 chip and a float16/bfloat16 model (:func:`require_npu`,
checked once per layer before any candidate is asked). The upstream sources they follow and the
layouts in detail: ``docs/sources.md``.
"""

from __future__ import annotations

import logging
import os

import torch

from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import (
    Int8Kernel,
    Int8LinearSpec,
    IntDynamicKernel,
    IntDynamicSpec,
    KernelConfig,
    LinearKernel,
    W4A8Spec,
    WeightOnlySpec,
)
from vllm_ptq_ascend.kernels.torch_generic import drop_params
from vllm_ptq_ascend.validation import require_int_range

logger = logging.getLogger(__name__)

ACL_FORMAT_FRACTAL_NZ = 29  # vllm_ascend/utils.py
NPU_DTYPES = (torch.float16, torch.bfloat16)
KRONECKER_QUANT_MAX_BATCH_SIZE = 32768  # vllm_ascend/quantization/methods/w4a4_flatquant.py
KRONECKER_MAX_FACTOR = 256  # aclnnFlatQuant: n1, n2 in [1, 256]
INT4_PER_INT32 = 8
_INT8_PARAMS = ("weight", "weight_scale", "input_scale", "input_zero_point")


def _torch_npu():
    import torch_npu  # lazy: present only on Ascend (or the tests' emulation)

    return torch_npu


def weight_nz_mode() -> int:
    """vLLM-Ascend's ``weight_nz_mode``: from its config once initialised, else ``VLLM_ASCEND_ENABLE_NZ``
    (default 1), as its ``AscendConfig`` reads it."""
    try:
        from vllm_ascend.ascend_config import get_ascend_config
    except ImportError:
        get_ascend_config = None
    if get_ascend_config is not None:
        try:
            return int(get_ascend_config().weight_nz_mode)
        except RuntimeError:  # "Ascend config is not initialized": outside a vLLM-Ascend engine
            pass
    return int(os.environ.get("VLLM_ASCEND_ENABLE_NZ", "1"))


def maybe_trans_nz(npu, weight: torch.Tensor) -> torch.Tensor:
    """FRACTAL_NZ where vLLM-Ascend's ``maybe_trans_nz`` casts on Atlas A2/A3 (the 310P, where it
    always casts, is refused before)."""
    if weight.dtype == torch.float32 or weight.is_meta:
        return weight
    mode = weight_nz_mode()
    if not mode or (weight.dtype in NPU_DTYPES and mode != 2):
        return weight
    return npu.npu_format_cast(weight, ACL_FORMAT_FRACTAL_NZ)


SERVED_CHIPS = "Atlas A2/A3 (Ascend910B*, Ascend910_93*)"
_310P_LACKS = {
    "dynamic_quant": "npu_dynamic_quant",
    "pertoken": "per-token scales in npu_quant_matmul",
    "bf16": "bfloat16",
    "int4": "int4 matmuls",
}


def chip_family(version: int) -> str:
    """vLLM-Ascend's AscendDeviceType for a ``torch_npu.npu.get_soc_version()`` (check_ascend_device_type)."""
    if 220 <= version <= 225:
        return "A2"
    if 250 <= version <= 255:
        return "A3"
    if 200 <= version <= 205:
        return "310P"
    if version == 260:
        return "A5"
    return "unknown"


def require_served_chip(npu, name: str, dtype: torch.dtype, needs: tuple[str, ...]) -> None:
    """Refuse, naming the layer, any chip but Atlas A2/A3. ``needs``: what the layer's kernels use
    among ``_310P_LACKS`` (bf16 is added from the layer's dtype)."""
    version = int(npu.npu.get_soc_version())
    family = chip_family(version)
    if family in ("A2", "A3"):
        return
    device = str(npu.npu.get_device_name())
    if family != "310P":
        raise RuntimeError(
            f"layer '{name}': the Ascend kernels serve {SERVED_CHIPS} only; this is {device} "
            f"(soc_version {version}, {family}). Serve it with VLLM_PTQ_ASCEND_KERNELS=torch"
        )
    needs = (*needs, "bf16") if dtype == torch.bfloat16 else needs
    lacking = [_310P_LACKS[n] for n in _310P_LACKS if n in needs]
    why = (
        f"this layer needs {', '.join(lacking)}, which the 310P lacks"
        if lacking
        else "its static W8A8 / W8A16 kernels use other weight layouts (x2 transposed to (n, k) before "
        "FRACTAL_NZ), which this backend does not implement (vLLM-Ascend has its own 310P schemes)"
    )
    raise RuntimeError(
        f"layer '{name}': {device} (soc_version {version}) is an Atlas 310P chip, which lacks "
        f"{', '.join(_310P_LACKS.values())}; {why}. The Ascend kernels serve {SERVED_CHIPS} only; "
        "serve it with VLLM_PTQ_ASCEND_KERNELS=torch"
    )


def antiquant_group_ok(group_size: int, in_features: int) -> bool:
    """The group sizes npu_weight_quant_batchmatmul takes: multiples of 32 in [32, K-1]."""
    return group_size % 32 == 0 and 32 <= group_size <= in_features - 1


def npu_needs(spec) -> tuple[str, ...]:
    """What a layer's NPU kernels use among ``_310P_LACKS``, by its spec."""
    if isinstance(spec, Int8LinearSpec):
        return () if spec.static_input else ("dynamic_quant", "pertoken")
    if isinstance(spec, W4A8Spec):
        return ("dynamic_quant", "pertoken") + (("int4",) if spec.group_size != -1 else ())
    if isinstance(spec, IntDynamicSpec):
        int4 = spec.weight_bits == 4 and spec.act_bits == 4
        return ("pertoken",) + (("int4",) if int4 else ()) + (() if spec.kronecker else ("dynamic_quant",))
    return ("int4",) if spec.num_bits == 4 else ()


def require_npu(config: KernelConfig) -> None:
    """The chip, then the dtype: errors that name the layer, before any kernel is chosen."""
    spec = config.spec
    if isinstance(spec, W4A8Spec) and spec.group_size == config.in_features:
        spec = W4A8Spec(-1)
    require_served_chip(_torch_npu(), config.layer_name, config.params_dtype, npu_needs(spec))
    if config.params_dtype not in NPU_DTYPES:
        raise ValueError(
            f"layer '{config.layer_name}': the Ascend kernels (npu_dynamic_quant, "
            f"npu_quant_matmul, npu_weight_quant_batchmatmul) take float16/bfloat16 activations, "
            f"the model runs in {config.params_dtype}; serve it with --dtype bfloat16 or float16 "
            "(or VLLM_PTQ_ASCEND_KERNELS=torch)"
        )


def antiquant_group_reason(group_size: int, in_features: int) -> str | None:
    if group_size == -1 or antiquant_group_ok(group_size, in_features):
        return None
    return (
        f"group size {group_size} is not supported by npu_weight_quant_batchmatmul "
        f"(multiples of 32 in [32, {in_features - 1}])"
    )


# -- W8A8 -------------------------------------------------------------------------------------------
class NpuInt8Kernel(Int8Kernel):
    """npu_quantize (static) or npu_dynamic_quant (per token), then npu_quant_matmul."""

    @classmethod
    def can_implement(cls, config):
        return True, None

    def process_weights_after_loading(self, layer):
        spec: Int8LinearSpec = self.spec
        npu = _torch_npu()
        dtype = self.config.params_dtype
        w_scale = layer.weight_scale.data.float()
        if not spec.weight_per_channel:  # one scale per fused shard -> one per output channel
            counts = torch.tensor(self.config.shape.output_partition_sizes, device=w_scale.device)
            w_scale = torch.repeat_interleave(w_scale.reshape(-1), counts)
        w_scale = w_scale.reshape(-1).contiguous()
        w_t = layer.weight.data.to(torch.int8).t().contiguous()  # [in, out]
        self.weight = maybe_trans_nz(npu, w_t)
        self.static = spec.static_input
        if spec.static_input:
            zps = None if spec.input_symmetric else layer.input_zero_point.data
            scale, zp = torch_ops.merge_static_input_ranges(layer.input_scale.data.float(), zps)
            k = w_t.shape[0]
            # npu_quantize(div_mode=False) multiplies: scale and offset per input channel, model dtype
            self.x_recip = (1.0 / scale).reshape(1).repeat(k).to(dtype)
            self.x_offset = None if zp is None else zp.float().reshape(1).repeat(k).to(dtype)
            deq = (scale * w_scale).float().contiguous()
            # fp16 output without pertoken_scale takes the int64 quant parameter only (docs, aclnn)
            self.deq = deq if dtype == torch.bfloat16 else npu.npu_trans_quant_param(deq)
            self.quant_bias = (
                None if zp is None else (-zp.to(torch.int64) * w_t.to(torch.int64).sum(0)).to(torch.int32)
            )
        else:
            self.w_scale = w_scale
        drop_params(layer, *_INT8_PARAMS)

    def quantize_input(self, x):
        npu = _torch_npu()
        if self.static:
            return npu.npu_quantize(x, self.x_recip, self.x_offset, torch.qint8, -1, False), None, None
        x_q, scale = npu.npu_dynamic_quant(x)
        return x_q, scale, None

    def mm(self, x_q, x_scale, x_zp, bias, out_dtype):
        npu = _torch_npu()
        if not self.static:
            return npu.npu_quant_matmul(
                x_q,
                self.weight,
                self.w_scale,
                pertoken_scale=x_scale,
                bias=None if bias is None else bias.float(),
                output_dtype=out_dtype,
            )
        # bf16 output takes a float bias in the op when the int32 slot is free; fp16 output
        # without pertoken_scale takes int32 bias only, so the float bias is added after.
        fuse_bias = bias is not None and self.quant_bias is None and out_dtype == torch.bfloat16
        out = npu.npu_quant_matmul(
            x_q,
            self.weight,
            self.deq,
            bias=bias.float() if fuse_bias else self.quant_bias,
            output_dtype=out_dtype,
        )
        if bias is not None and not fuse_bias:
            out = out + bias.to(out.dtype)
        return out


# -- weight-only (and W4A8 per group, whose int8 activations run on the int8 grid) --------------------
class AntiquantWeight:
    """A weight for npu_weight_quant_batchmatmul: [in, out] (int8, or int4 packed 8 per int32) with
    antiquant scale/offset [groups, out] (or [out] per channel)."""

    def __init__(self, w_int, scale, zp, group: int, num_bits: int, dtype: torch.dtype) -> None:
        npu = _torch_npu()
        out_f, in_f = w_int.shape
        if num_bits == 4 and group == -1 and in_f % 8 == 0:
            # packed along K, passed as the transpose of (out, in/8): the per-channel layout the docs
            # recommend (as vllm-ascend w4a4_laos_dynamic.py does)
            weight = npu.npu_convert_weight_to_int4pack(w_int.to(torch.int32).contiguous()).t()
        elif num_bits == 4 and out_f % 8 == 0:
            # [in, out/8], packed along N (vllm-ascend's W4A8 linear, before #13713)
            weight = npu.npu_convert_weight_to_int4pack(w_int.t().contiguous().to(torch.int32))
        elif num_bits == 4 and in_f % 8 == 0:
            weight = npu.npu_convert_weight_to_int4pack(w_int.to(torch.int32).contiguous()).t()
        else:  # int8 weights (W8A16, or int4 values no packing fits: exact, one byte each)
            weight = w_int.to(torch.int8).t().contiguous()
            if group == -1:  # as vLLM-Ascend's W8A16; NZ int8 per group is refused by the op
                weight = maybe_trans_nz(npu, weight)
        if group == -1:
            a_scale = scale.reshape(-1).to(dtype).contiguous()
            a_off = None if zp is None else (-zp.reshape(-1).float()).to(dtype).contiguous()
        else:
            a_scale = scale.t().to(dtype).contiguous()
            a_off = None if zp is None else (-zp.float()).t().to(dtype).contiguous()
        self.args = {
            "weight": weight,
            "antiquant_scale": a_scale,
            "antiquant_offset": a_off,
            "antiquant_group_size": 0 if group == -1 else group,
        }

    def mm(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            bias = bias.to(torch.float32 if x2.dtype == torch.bfloat16 else torch.float16).contiguous()
        return _torch_npu().npu_weight_quant_batchmatmul(x2, bias=bias, **self.args)


class NpuWeightOnlyKernel(LinearKernel):
    """npu_weight_quant_batchmatmul (act-order layers are permuted first by ActOrderKernel)."""

    family = WeightOnlySpec

    @classmethod
    def can_implement(cls, config):
        spec: WeightOnlySpec = config.spec
        if spec.has_g_idx:
            return False, "act-order g_idx (ActOrderKernel permutes the input first)"
        group = -1 if spec.group_size in (-1, config.in_features) else spec.group_size
        why = antiquant_group_reason(group, config.in_features)
        return why is None, why

    def process_weights_after_loading(self, layer):
        spec: WeightOnlySpec = self.spec
        group = -1 if spec.group_size in (-1, self.config.in_features) else spec.group_size
        w_int = torch_ops.unpack_weight(layer, spec.num_bits)
        zp = torch_ops.unpack_zero_point(layer, spec.num_bits)
        scale = layer.weight_scale.data
        drop_params(layer, "weight_packed", "weight", "weight_zero_point", "weight_g_idx", "weight_scale")
        self.antiquant = AntiquantWeight(w_int, scale, zp, group, spec.num_bits, self.config.params_dtype)

    def apply(self, layer, x, bias):
        return self.antiquant.mm(x, bias)


class NpuW4A8AntiquantKernel(LinearKernel):
    """W4A8 per group: npu_dynamic_quant's int8 grid, in the model dtype, through
    npu_weight_quant_batchmatmul's int4 antiquant (no grouped int4 x int8 matmul exists)."""

    family = W4A8Spec

    @classmethod
    def can_implement(cls, config):
        group = config.spec.group_size
        if group in (-1, config.in_features):
            return False, "per-channel scales (the int8 GEMM serves those)"
        why = antiquant_group_reason(group, config.in_features)
        return why is None, why

    def process_weights_after_loading(self, layer):
        w_int = torch_ops.unpack_weight(layer, 4)
        scale = layer.weight_scale.data
        drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_shape")
        group, dtype = self.spec.group_size, self.config.params_dtype
        self.antiquant = AntiquantWeight(w_int, scale, None, group, 4, dtype)

    def apply(self, layer, x, bias):
        x_q, x_scale = _torch_npu().npu_dynamic_quant(x)
        x = (x_q.float() * x_scale.float().reshape(-1, 1)).to(x.dtype)  # the int8 grid, in the model dtype
        return self.antiquant.mm(x, bias)


# -- W4A4 / FlatQuant: int4 x int4 ------------------------------------------------------------------------
def int4_gemm_reason(config: KernelConfig) -> str | None:
    """Why the int4 x int4 npu_quant_matmul cannot take the layer, or None."""
    spec: IntDynamicSpec = config.spec
    if spec.act_bits != 4:
        return f"{spec.act_bits}-bit activations (the int4 matmul takes 4-bit ones)"
    if spec.weight_bits != 4:
        return f"{spec.weight_bits}-bit weights with 4-bit activations (the int4 matmul takes int4 weights)"
    in_f, out_f = config.in_features, config.out_features
    if in_f % INT4_PER_INT32 or out_f % INT4_PER_INT32:
        return f"int4 matmul needs in/out features in multiples of 8 ({in_f}/{out_f})"
    return None


class _Int4Gemm(IntDynamicKernel):
    """int4 x int4 npu_quant_matmul on the weight packed as vLLM-Ascend packs it."""

    def process_weights_after_loading(self, layer):
        npu = _torch_npu()
        w_int = torch_ops.unpack_weight(layer, 4)
        require_int_range(f"layer '{self.config.layer_name}', tensor 'weight'", w_int, 4, "4-bit weights")
        packed = npu.npu_convert_weight_to_int4pack(w_int.to(torch.int32).contiguous())  # [out, in/8]
        self.weight = packed.t()  # (in/8, out): the transpose of a contiguous (n, k/8)
        self.w_scale = layer.weight_scale.data.float().reshape(-1).contiguous()
        drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_shape")

    def mm(self, x_q, x_scale, bias, out_dtype):
        out = _torch_npu().npu_quant_matmul(
            x_q,
            self.weight,
            self.w_scale,
            pertoken_scale=x_scale.reshape(-1).float(),
            bias=None,  # int4 x int4 with pertoken_scale takes no bias
            output_dtype=out_dtype,
        )
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out


class NpuDynamicInt4Kernel(_Int4Gemm):
    """W4A4 without a transform: npu_dynamic_quant to int4 (its grid is the scheme's), int4 matmul."""

    @classmethod
    def can_implement(cls, config):
        if config.spec.kronecker is not None:
            return False, "an online transform (npu_dynamic_quant does not transform)"
        why = int4_gemm_reason(config)
        return why is None, why

    def quantize_input(self, x):
        return _torch_npu().npu_dynamic_quant(x, dst_type=torch.quint4x2)


class NpuKroneckerKernel(_Int4Gemm):
    """FlatQuant W4A4: npu_kronecker_quant (transform, clip, int4) then the int4 matmul, as
    vLLM-Ascend's w4a4_flatquant runs it."""

    @classmethod
    def can_implement(cls, config):
        spec: IntDynamicSpec = config.spec
        if spec.kronecker is None:
            return False, "no online transform"
        why = int4_gemm_reason(config)
        if why:
            return False, why
        n1, n2 = spec.kronecker
        if n2 % INT4_PER_INT32 or max(n1, n2) > KRONECKER_MAX_FACTOR:
            return False, f"npu_kronecker_quant does not take a {n1} x {n2} transform (n2 % 8, n1, n2 <= 256)"
        return True, None

    def process_weights_after_loading(self, layer):
        clip = self.transform.clip_ratio
        if clip > 1.0:
            raise ValueError(
                f"layer '{self.config.layer_name}': npu_kronecker_quant does not take clip ratio {clip} "
                "(it takes (0, 1])"
            )
        super().process_weights_after_loading(layer)
        dtype = self.config.params_dtype  # as vllm-ascend: P1 = left^T, both in the model dtype
        self.p1 = self.transform.left.t().contiguous().to(dtype)
        self.p2 = self.transform.right.contiguous().to(dtype)

    def quantize_input(self, x):
        npu = _torch_npu()
        n1, n2 = self.spec.kronecker
        p1, p2 = self.p1, self.p2
        if p1.dtype != x.dtype:
            p1, p2 = p1.to(x.dtype), p2.to(x.dtype)
        x3 = x.reshape(-1, n1, n2)
        clip = self.transform.clip_ratio
        outs, scales = [], []
        for chunk in torch.split(x3, KRONECKER_QUANT_MAX_BATCH_SIZE, dim=0):
            out, scale = npu.npu_kronecker_quant(chunk, p1, p2, clip_ratio=clip, dst_dtype=torch.int32)
            outs.append(out)
            scales.append(scale)
        x_q = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        scale = scales[0] if len(scales) == 1 else torch.cat(scales, dim=0)
        return x_q.view(-1, n1 * n2 // INT4_PER_INT32), scale.reshape(-1).float()
