"""Ascend NPU backend: torch_npu's quantized matmuls, called the way vLLM-Ascend calls them.

The upstream sources it follows and the layouts in detail: ``docs/sources.md``.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from vllm_ptq_ascend.kernels import torch_ops
from vllm_ptq_ascend.kernels.base import Int8LinearSpec, IntDynamicSpec, W4A8Spec, WeightOnlySpec
from vllm_ptq_ascend.kernels.torch_generic import TorchBackend, drop_params, set_param
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


def _layer_name(layer: torch.nn.Module) -> str:
    return getattr(layer, "prefix", "") or type(layer).__name__


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


def require_served_chip(npu, layer: torch.nn.Module, needs: tuple[str, ...]) -> None:
    """Refuse, naming the layer, any chip but Atlas A2/A3. ``needs``: what the layer's kernels use
    among ``_310P_LACKS`` (bf16 is added from the layer's dtype)."""
    version = int(npu.npu.get_soc_version())
    family = chip_family(version)
    if family in ("A2", "A3"):
        return
    name = _layer_name(layer)
    device = str(npu.npu.get_device_name())
    if family != "310P":
        raise RuntimeError(
            f"layer '{name}': the Ascend kernels serve {SERVED_CHIPS} only; this is {device} "
            f"(soc_version {version}, {family}). Serve it with VLLM_PTQ_ASCEND_KERNELS=torch"
        )
    needs = (*needs, "bf16") if layer.params_dtype == torch.bfloat16 else needs
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


class NpuBackend(TorchBackend):
    """torch_npu kernels; the torch paths only for shapes those kernels do not take."""

    name = "npu"

    def _require_served(self, layer: torch.nn.Module, needs: tuple[str, ...]) -> None:
        """The chip, then the dtype: errors that name the layer, at load."""
        require_served_chip(_torch_npu(), layer, needs)
        self._require_npu_dtype(layer)

    def _require_npu_dtype(self, layer: torch.nn.Module) -> None:
        if layer.params_dtype not in NPU_DTYPES:
            raise ValueError(
                f"layer '{_layer_name(layer)}': the Ascend kernels (npu_dynamic_quant, "
                f"npu_quant_matmul, npu_weight_quant_batchmatmul) take float16/bfloat16 activations, "
                f"the model runs in {layer.params_dtype}; serve it with --dtype bfloat16 or float16 "
                "(or VLLM_PTQ_ASCEND_KERNELS=torch)"
            )

    # -- W8A8 ----------------------------------------------------------------
    def prepare_int8(self, layer: torch.nn.Module, spec: Int8LinearSpec) -> None:
        self._require_served(layer, () if spec.static_input else ("dynamic_quant", "pertoken"))
        npu = _torch_npu()
        dtype = layer.params_dtype
        w_scale = layer.weight_scale.data.float()
        if not spec.weight_per_channel:  # one scale per fused shard -> one per output channel
            counts = torch.tensor(layer.logical_widths, device=w_scale.device)
            w_scale = torch.repeat_interleave(w_scale.reshape(-1), counts)
        w_scale = w_scale.reshape(-1).contiguous()
        w_t = layer.weight.data.to(torch.int8).t().contiguous()  # [in, out]
        layer.ptq_npu_w = maybe_trans_nz(npu, w_t)
        layer.ptq_npu_static = spec.static_input
        layer.ptq_npu_w4a8 = "int8"
        if spec.static_input:
            zps = None if spec.input_symmetric else layer.input_zero_point.data
            scale, zp = torch_ops.merge_static_input_ranges(layer.input_scale.data.float(), zps)
            k = w_t.shape[0]
            # npu_quantize(div_mode=False) multiplies: scale and offset per input channel, model dtype
            layer.ptq_npu_x_recip = (1.0 / scale).reshape(1).repeat(k).to(dtype)
            layer.ptq_npu_x_offset = None if zp is None else zp.float().reshape(1).repeat(k).to(dtype)
            deq = (scale * w_scale).float().contiguous()
            # fp16 output without pertoken_scale takes the int64 quant parameter only (docs, aclnn)
            layer.ptq_npu_deq = deq if dtype == torch.bfloat16 else npu.npu_trans_quant_param(deq)
            layer.ptq_npu_quant_bias = (
                None if zp is None else (-zp.to(torch.int64) * w_t.to(torch.int64).sum(0)).to(torch.int32)
            )
        else:
            layer.ptq_npu_w_scale = w_scale
        drop_params(layer, *_INT8_PARAMS)

    def quant_act_int8(self, layer, x):
        npu = _torch_npu()
        if getattr(layer, "ptq_npu_static", False):
            x_q = npu.npu_quantize(x, layer.ptq_npu_x_recip, layer.ptq_npu_x_offset, torch.qint8, -1, False)
            return x_q, None, None
        x_q, scale = npu.npu_dynamic_quant(x)
        return x_q, scale, None

    def int8_mm(self, layer, x_q, x_scale, x_zp, bias, out_dtype):
        npu = _torch_npu()
        if not layer.ptq_npu_static:
            return npu.npu_quant_matmul(
                x_q,
                layer.ptq_npu_w,
                layer.ptq_npu_w_scale,
                pertoken_scale=x_scale,
                bias=None if bias is None else bias.float(),
                output_dtype=out_dtype,
            )
        quant_bias = layer.ptq_npu_quant_bias
        # bf16 output takes a float bias in the op when the int32 slot is free; fp16 output
        # without pertoken_scale takes int32 bias only, so the float bias is added after.
        fuse_bias = bias is not None and quant_bias is None and out_dtype == torch.bfloat16
        out = npu.npu_quant_matmul(
            x_q,
            layer.ptq_npu_w,
            layer.ptq_npu_deq,
            bias=bias.float() if fuse_bias else quant_bias,
            output_dtype=out_dtype,
        )
        if bias is not None and not fuse_bias:
            out = out + bias.to(out.dtype)
        return out

    # -- W4A8 ------------------------------------------------------------------
    def prepare_w4a8(self, layer: torch.nn.Module, spec: W4A8Spec) -> None:
        per_group = spec.group_size not in (-1, layer.input_size_per_partition)
        self._require_served(
            layer, ("dynamic_quant", "pertoken", "int4") if per_group else ("dynamic_quant", "pertoken")
        )
        in_features = layer.input_size_per_partition
        if spec.group_size == -1 or spec.group_size == in_features:
            w_int = torch_ops.unpack_weight(layer, 4)
            scale = layer.weight_scale.data.float()
            drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_shape")
            set_param(layer, "weight", w_int)
            set_param(layer, "weight_scale", scale.reshape(-1, 1))
            layer.input_scale = layer.input_zero_point = None
            self.prepare_int8(layer, Int8LinearSpec(True, False, True))
            return
        if not antiquant_group_ok(spec.group_size, in_features):
            self._warn_fallback(layer, f"group size {spec.group_size}")
            super().prepare_w4a8(layer, spec)
            layer.ptq_npu_static, layer.ptq_npu_w4a8 = False, "torch"
            return
        w_int = torch_ops.unpack_weight(layer, 4)
        scale = layer.weight_scale.data
        drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_shape")
        self._set_weight_only(layer, w_int, scale, None, spec.group_size, 4, None)
        layer.ptq_npu_static, layer.ptq_npu_w4a8 = False, "weight_only"

    def w4a8_mm(self, layer, x_q, x_scale, bias, out_dtype):
        mode = layer.ptq_npu_w4a8
        if mode == "int8":
            return self.int8_mm(layer, x_q, x_scale, None, bias, out_dtype)
        if mode == "torch":
            return torch_ops.int8_x_dequantized_mm(x_q, x_scale, layer.ptq_w4a8_deq_t, bias, out_dtype)
        x = (x_q.float() * x_scale.float().reshape(-1, 1)).to(out_dtype)  # the int8 grid, in the model dtype
        return self._weight_quant_mm(layer, x, bias)

    # -- W4A4 / FlatQuant ---------------------------------------------------------
    def prepare_int_dynamic(self, layer: torch.nn.Module, spec: IntDynamicSpec) -> None:
        int4 = spec.weight_bits == 4 and spec.act_bits == 4
        needs = ("pertoken",) + (("int4",) if int4 else ()) + (() if spec.kronecker else ("dynamic_quant",))
        self._require_served(layer, needs)
        name = _layer_name(layer)
        w_int = layer.weight.data.to(torch.int8)
        out_f, in_f = w_int.shape
        bits = spec.weight_bits
        require_int_range(f"layer '{name}', tensor 'weight'", w_int, bits, f"{bits}-bit weights")
        clip = 1.0
        if spec.kronecker is not None:
            n1, n2 = spec.kronecker
            left, right = spec.transform.left, spec.transform.right
            if n1 * n2 != in_f or tuple(left.shape) != (n1, n1) or tuple(right.shape) != (n2, n2):
                raise ValueError(
                    f"layer '{name}': Kronecker transform ({n1} x {n2}) with factors "
                    f"{tuple(left.shape)} and {tuple(right.shape)} does not match {in_f} input features"
                )
            clip = float(spec.transform.clip_ratio)
            if not (math.isfinite(clip) and clip > 0):
                raise ValueError(f"layer '{name}': activation clip ratio must be positive, got {clip}")
        int4_gemm = spec.act_bits == 4 and spec.weight_bits == 4
        if int4_gemm and (in_f % INT4_PER_INT32 or out_f % INT4_PER_INT32):
            why = f"int4 matmul needs in/out features in multiples of 8 ({in_f}/{out_f})"
            self._warn_int_dynamic(layer, why)
            int4_gemm = False
        elif spec.act_bits == 4 and not int4_gemm:
            self._warn_int_dynamic(layer, f"{spec.weight_bits}-bit weights with 4-bit activations")
        if spec.kronecker is None:  # clip 1: npu_dynamic_quant's grid is the scheme's
            act = "dynamic" if int4_gemm or spec.act_bits == 8 else "torch"
        elif not int4_gemm:  # 8-bit FlatQuant (by design), or a W4A4 fallback warned above
            act = "torch"
        elif n2 % INT4_PER_INT32 or max(n1, n2) > KRONECKER_MAX_FACTOR or clip > 1.0:
            why = (
                f"npu_kronecker_quant does not take clip ratio {clip} (it takes (0, 1])"
                if clip > 1.0
                else f"npu_kronecker_quant does not take a {n1} x {n2} transform (n2 % 8, n1, n2 <= 256)"
            )
            self._warn_int_dynamic(layer, why)
            act, int4_gemm = "torch", False
        else:
            act = "kronecker"
        layer.ptq_dynamic_spec = spec
        layer.ptq_npu_act = act
        layer.ptq_npu_gemm = "int4" if int4_gemm else "int8"
        layer.ptq_npu_clip = clip
        layer.ptq_npu_p1 = layer.ptq_npu_p2 = layer.ptq_npu_left = layer.ptq_npu_right = None
        if act == "kronecker":  # as vllm-ascend: P1 = left^T, both in the model dtype
            layer.ptq_npu_p1 = spec.transform.left.t().contiguous().to(layer.params_dtype)
            layer.ptq_npu_p2 = spec.transform.right.contiguous().to(layer.params_dtype)
        elif spec.kronecker is not None:  # transform in float32 in torch
            layer.ptq_npu_left = spec.transform.left.float().contiguous()
            layer.ptq_npu_right = spec.transform.right.float().contiguous()
        if int4_gemm:
            npu = _torch_npu()
            packed = npu.npu_convert_weight_to_int4pack(w_int.to(torch.int32).contiguous())  # [out, in/8]
            layer.ptq_npu_w = packed.t()  # (in/8, out): the transpose of a contiguous (n, k/8)
            layer.ptq_npu_w_scale = layer.weight_scale.data.float().reshape(-1).contiguous()
            layer.ptq_npu_static = False
            drop_params(layer, "weight", "weight_scale")
            return
        layer.input_scale = layer.input_zero_point = None
        self.prepare_int8(layer, Int8LinearSpec(True, False, True))

    def quant_act_dynamic(self, layer, x):
        spec: IntDynamicSpec = layer.ptq_dynamic_spec
        act = layer.ptq_npu_act
        if act == "dynamic":
            dst_type = torch.quint4x2 if layer.ptq_npu_gemm == "int4" else None
            return _torch_npu().npu_dynamic_quant(x, dst_type=dst_type)
        if act == "kronecker":
            return self._kronecker_quant(layer, x)
        # "torch": transform in float32 and quantize exactly as the portable backend does (int8 storage)
        xt = x.float()
        if spec.kronecker is not None:
            xt = torch_ops.kronecker_transform(xt, layer.ptq_npu_left, layer.ptq_npu_right)
        x_q, scale = torch_ops.per_token_quant_clipped(xt, spec.act_qmax, layer.ptq_npu_clip)
        return x_q, scale.reshape(-1)

    def _kronecker_quant(self, layer, x):
        npu = _torch_npu()
        n1, n2 = layer.ptq_dynamic_spec.kronecker
        p1, p2 = layer.ptq_npu_p1, layer.ptq_npu_p2
        if p1.dtype != x.dtype:
            p1, p2 = p1.to(x.dtype), p2.to(x.dtype)
        x3 = x.reshape(-1, n1, n2)
        clip = layer.ptq_npu_clip
        outs, scales = [], []
        for chunk in torch.split(x3, KRONECKER_QUANT_MAX_BATCH_SIZE, dim=0):
            out, scale = npu.npu_kronecker_quant(chunk, p1, p2, clip_ratio=clip, dst_dtype=torch.int32)
            outs.append(out)
            scales.append(scale)
        x_q = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        scale = scales[0] if len(scales) == 1 else torch.cat(scales, dim=0)
        return x_q.view(-1, n1 * n2 // INT4_PER_INT32), scale.reshape(-1).float()

    def int_dynamic_mm(self, layer, x_q, x_scale, bias, out_dtype):
        x_scale = x_scale.reshape(-1).float()
        if layer.ptq_npu_gemm == "int8":
            return self.int8_mm(layer, x_q, x_scale, None, bias, out_dtype)
        npu = _torch_npu()
        out = npu.npu_quant_matmul(
            x_q,
            layer.ptq_npu_w,
            layer.ptq_npu_w_scale,
            pertoken_scale=x_scale,
            bias=None,  # int4 x int4 with pertoken_scale takes no bias
            output_dtype=out_dtype,
        )
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out

    @staticmethod
    def _warn_int_dynamic(layer, why: str) -> None:
        logger.warning(
            "layer '%s': %s; activations are quantized in torch, then the int8 npu_quant_matmul",
            _layer_name(layer),
            why,
        )

    # -- W4A16 / W8A16 ---------------------------------------------------------
    def prepare_weight_only(self, layer: torch.nn.Module, spec: WeightOnlySpec) -> None:
        self._require_served(layer, ("int4",) if spec.num_bits == 4 else ())
        in_features = layer.input_size_per_partition
        group = -1 if spec.group_size in (-1, in_features) else spec.group_size
        if group != -1 and not antiquant_group_ok(group, in_features):
            self._warn_fallback(layer, f"group size {spec.group_size}")
            return self._fallback_weight_only(layer, spec)
        perm = None
        if spec.has_g_idx:
            g_idx = layer.weight_g_idx.data.to(torch.long)
            n_groups = layer.weight_scale.shape[1]
            counts = torch.bincount(g_idx, minlength=n_groups)
            if group == -1 or n_groups * group != in_features or bool((counts != group).any()):
                self._warn_fallback(layer, "act-order g_idx without exactly group_size channels per group")
                return self._fallback_weight_only(layer, spec)
            perm = torch.argsort(g_idx, stable=True)
        w_int = torch_ops.unpack_weight(layer, spec.num_bits)
        zp = torch_ops.unpack_zero_point(layer, spec.num_bits)
        scale = layer.weight_scale.data
        drop_params(layer, "weight_packed", "weight", "weight_zero_point", "weight_g_idx", "weight_scale")
        self._set_weight_only(layer, w_int, scale, zp, group, spec.num_bits, perm)
        layer.ptq_fast = True

    def weight_only_mm(self, layer, x, bias):
        if layer.ptq_npu_wo is None:
            return super().weight_only_mm(layer, x, bias)
        out = self._weight_quant_mm(layer, x.reshape(-1, x.shape[-1]), bias)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])

    # -- helpers ---------------------------------------------------------------
    def _fallback_weight_only(self, layer, spec):
        self.dequantize_once(layer, spec)
        layer.ptq_npu_wo = None

    @staticmethod
    def _warn_fallback(layer, why: str) -> None:
        logger.warning(
            "layer '%s': %s is not supported by npu_weight_quant_batchmatmul; using the torch path "
            "(weight dequantized once at load)",
            _layer_name(layer),
            why,
        )

    def _set_weight_only(self, layer, w_int, scale, zp, group, num_bits, perm) -> None:
        """Weight [in, out] (int8, or int4 packed 8 per int32), antiquant scale/offset [groups, out]."""
        npu = _torch_npu()
        dtype = layer.params_dtype
        if perm is not None:
            w_int = w_int[:, perm.to(w_int.device)]
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
        layer.ptq_npu_wo = {
            "weight": weight,
            "antiquant_scale": a_scale,
            "antiquant_offset": a_off,
            "antiquant_group_size": 0 if group == -1 else group,
        }
        layer.ptq_npu_perm = None if perm is None else perm.to(w_int.device)

    def _weight_quant_mm(self, layer, x2, bias):
        npu = _torch_npu()
        if layer.ptq_npu_perm is not None:
            x2 = x2.index_select(1, layer.ptq_npu_perm)
        if bias is not None:
            bias = bias.to(torch.float32 if x2.dtype == torch.bfloat16 else torch.float16).contiguous()
        return npu.npu_weight_quant_batchmatmul(x2, bias=bias, **layer.ptq_npu_wo)
