"""A fake ``torch_npu`` for tests: pure-torch emulation of the few ops ``kernels/npu.py`` calls.

Used ONLY by tests (a fixture puts this module into ``sys.modules["torch_npu"]``); there is no
NPU and no CANN on CI. Each op keeps torch_npu's name, argument names and defaults, checks the
dtypes, shapes and layouts its documentation allows (misuse raises, as on hardware), and computes
exactly where the hardware does (int32 accumulation, emulated in float64, exact for K <= 65535),
with a float32 epilogue and the final rounding to the output dtype.

Sources (the documentation and op adapter code of torch_npu, read 2026-08):
- Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_quant_matmul.md (formula,
  dtype-combination table 2 for Atlas A2/A3, int4 layout rules, K/N <= 65535),
  torch_npu-npu_weight_quant_batchmatmul.md (ANTIQUANT(w) = (w + offset) * scale, scale/offset
  shapes, antiquant_group_size in [32, K-1] and a multiple of 32, bias float32 for bf16 x and
  float16 for fp16 x, FRACTAL_NZ weights not supported in single-op mode),
  torch_npu-npu_dynamic_quant.md (scale = rowMax(|x|) / 127, y = round(x / scale), scale float32
  with x's shape minus the last dim), torch_npu-npu_quantize.md (div_mode=False:
  input * scales + zero_points; scales/zero_points of input's dtype, 1-D of input.shape[axis] or 1),
  torch_npu-npu_convert_weight_to_int4pack.md, torch_npu-npu_trans_quant_param.md (int64 scale:
  float32 bits truncated to FP19, & 0xFFFFE000, in the low 32 bits).
- Ascend/op-plugin op_plugin/ops/opapi/ConvertWeightToINT4PackKernelNpuOpApi.cpp (packing order:
  8 consecutive values of the last dim per int32, first value in the lowest nibble, two's
  complement nibbles) and QuantMatmulKernelNpuOpApi.cpp (a float32 scale with no pertoken_scale and
  a non-bf16 output goes through npu_trans_quant_param, i.e. FP19, as an int64 scale does; A4W4:
  x1 and x2 both int32, x2 either (k, n/8) contiguous or the transpose of a contiguous (n, k/8)).
- int4 activations (Ascend/op-plugin at 517f2e7): torch_npu-npu_dynamic_quant.md (dst_type=quint4x2:
  scale = rowMax(|x|) / 7, int32 output with the last dim / 8, 8 int4 per int32; the last dim of x
  a multiple of 8), test/test_custom_ops/test_npu_dynamic_quant.py (its int4 decoding: low nibble
  first), torch_npu-npu_quant_matmul.md table 2 (int32 x int32 rows: fp16 output with an
  int64/float32 scale and int32 or no bias; bf16/fp16 output with a float32 scale, a float32
  pertoken_scale and no bias).
- npu_kronecker_quant (op-plugin KroneckerQuantKernelNpuOpApi.cpp -> aclnnFlatQuant; docs in
  Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_kronecker_quant.md at 63f303d and
  hicann/ops-nn quant/flat_quant/docs/aclnnFlatQuant.md at e5c3fa9; kernel hicann/ops-nn
  quant/flat_quant/op_kernel/flat_quant_cube.h and flat_quant_vec.h at e5c3fa9):
  x'' = P1 @ (x @ P2) per token; quantScale = max|x''| * clip / 7 (float32, shape (K,));
  out = x'' * ((7 / clip) / max|x''|), packed 8 int4 per int32 along the last dim (low nibble first,
  as the op-plugin test's decoder reads it). The kernel writes x @ P2 in x's dtype and P1 @ (..)
  in float16 (F322F16 for both input dtypes), scales in float32, casts to half (RINT) and then to
  int4 (CAST_NONE = RINT). Shape limits: K in [1, 262144], M and N in [1, 256], N % 8 == 0 for
  int32 output; clip_ratio in (0, 1]. Inferred, not documented: the int4 cast saturates to
  [-8, 7] (Ascend's default saturation mode; with clip < 1 the scaled values reach 7 / clip).
- Scales and dtype combinations of npu_quant_matmul, as the op checks them (read 2026-11): the
  aclnn checkers hicann/ops-nn matmul/quant_batch_matmul_v3/op_host/op_api/aclnn_quant_matmul_v4.cpp
  (CheckDtypeValidOnOnlyL0c2out*: without pertoken_scale an int8 / float16 output refuses a
  float32 scale, "scale dtype should not be FLOAT", and a float16 bias; with pertoken_scale a
  float16 output needs a float32 scale, and a float16 bias needs a float16 output; a bfloat16
  bias needs a bfloat16 output; float16 scales are in no list) and quant_matmul_checker.cpp
  (PERTOKEN_FP16_OUT_BIAS_SUPPORT_LIST = int32/float16/float32), read at the jbgztxdy/ops-nn mirror
  (4d4c634). op-plugin's eager adapter (QuantMatmulKernelNpuOpApi.cpp) converts a float32 scale
  given with no pertoken_scale and an int8/float16 output through npu_trans_quant_param before
  calling aclnn; the docs say graph mode does not ("图模式不支持scale直接传入float32", and the
  graph example: "pertoken_scale为空时，输出fp16必须先调用npu_trans_quant_param"). The emulation
  refuses that call (it answers as aclnn and graph mode do): the documented way is the int64 of
  npu_trans_quant_param, valid in both modes. Docs table 2 prints "bfloat16" among the float16
  output's pertoken biases; the 600 docs and both checkers say float16 (followed here).
- npu_trans_quant_param (torch_npu-npu_trans_quant_param.md; aclnnTransQuantParamV2 docs; the
  ops-nn ATK golden of TransQuantParamV2): out = (bits(scale) & 0xFFFFE000) | 1 << 46, then with an
  offset: (out & 0x4000FFFFFFFF) | ((clamp(round(offset), -256, 255) & 0x1FF) << 37), round half
  to even as the golden's np.round. round_mode=1 ("R_INT") rounds the scale to its top 19 bits
  first; the emulation rounds to nearest, ties to even (inferred from the mode's name). The
  dequant unit reads the low 32 bits as FP19, so a plain float32 bit pattern in an int64 (what
  msModelSlim's deqscale2int64 writes and vLLM-Ascend's W8A8 static passes for float16 models;
  also Ascend C's SetQuantScalar example) is read the same way, bit 46 clear.
- FRACTAL_NZ is a property of the storage (torch_npu reads it from the NPUStorageDesc, so views
  and ``param.data = nz_tensor`` keep it): the emulation records it per storage.
  npu_weight_quant_batchmatmul: aclnnWeightQuantBatchMatmulV2.md (ops-nn) lists FRACTAL_NZ int8
  weights for per-channel dequantization on A2/A3 (per-group NZ only for int4/int32 weights), and
  vLLM-Ascend's W8A16 linear passes them (maybe_trans_nz); the torch_npu page's "FRACTAL_NZ only in
  graph mode" sits under the Atlas inference (310P) line and in a general note that upstream's use
  contradicts, so A2/A3 NZ int8 per-channel weights are accepted.
- The chip: ``torch_npu.npu.get_soc_version()`` / ``get_device_name()`` as vLLM-Ascend reads them
  (vllm_ascend/utils.py check_ascend_device_type: 220-225 Atlas A2, 250-255 A3, 200-205 310P), with
  the SoC names and numbers of Ascend/pytorch torch_npu/csrc/core/npu/NpuVariables.h. ``SOC_NAME``
  picks the emulated chip (tests set it). On the 310P (Atlas inference products) the ops refuse
  what their docs do not list there: npu_dynamic_quant, pertoken_scale, int4 operands, bfloat16, and
  npu_quant_matmul wants a FRACTAL_NZ x2 (ops-nn quant_matmul_checker CheckFormat). Other chips are
  not emulated.
"""

from __future__ import annotations

import types
import weakref

import torch

__all__ = [
    "ACL_FORMAT_FRACTAL_NZ",
    "ACL_FORMAT_ND",
    "get_npu_format",
    "npu",
    "npu_convert_weight_to_int4pack",
    "npu_dynamic_quant",
    "npu_format_cast",
    "npu_kronecker_quant",
    "npu_quant_matmul",
    "npu_quantize",
    "npu_trans_quant_param",
    "npu_weight_quant_batchmatmul",
]

EMULATED = True  # lets tests check that the fake, not a real torch_npu, is in use

ACL_FORMAT_ND = 2
ACL_FORMAT_FRACTAL_NZ = 29
MAX_KN = 65535
INT4_PER_INT32 = 8
KRONECKER_MAX_K = 262144  # aclnnFlatQuant: x's first dim in [1, 262144] (tests may lower it)
KRONECKER_MAX_MN = 256


def _fail(op: str, msg: str, exc=RuntimeError):
    raise exc(f"{op}: {msg}")


# -- the chip ------------------------------------------------------------------------------
# SoC name -> torch_npu.npu.get_soc_version() (NpuVariables.h). Tests pick the emulated chip by
# setting SOC_NAME (monkeypatch.setattr(torch_npu, "SOC_NAME", ...)).
SOC_VERSIONS = {
    "Ascend910A": 102,  # Atlas training series (not emulated)
    "Ascend310P1": 200,
    "Ascend310P3": 202,
    "Ascend310P5": 204,
    "Ascend910B1": 220,
    "Ascend910B2": 221,
    "Ascend910B3": 223,
    "Ascend910B4": 224,
    "Ascend910_9391": 250,
    "Ascend910_9392": 251,
    "Ascend910_9381": 252,
    "Ascend910_9382": 253,
    "Ascend910_9372": 254,
    "Ascend910_9362": 255,
}
SOC_NAME = "Ascend910B4"  # an Atlas 800I A2


def chip_family() -> str:
    """The emulated chip's family ("A2", "A3", "310P" or "other"), by vLLM-Ascend's soc_version ranges."""
    if SOC_NAME not in SOC_VERSIONS:
        raise ValueError(
            f"torch_npu emulation: unknown SOC_NAME {SOC_NAME!r} (known: {sorted(SOC_VERSIONS)})"
        )
    v = SOC_VERSIONS[SOC_NAME]
    if 220 <= v <= 225:
        return "A2"
    if 250 <= v <= 255:
        return "A3"
    if 200 <= v <= 205:
        return "310P"
    return "other"


def _get_soc_version() -> int:
    chip_family()  # validates SOC_NAME
    return SOC_VERSIONS[SOC_NAME]


def _get_device_name(device_name=None) -> str:
    chip_family()
    return SOC_NAME


npu = types.ModuleType("torch_npu.npu", "The emulated device namespace: the chip queries only.")
npu.get_soc_version = _get_soc_version
npu.get_device_name = _get_device_name


def _served_chip(op: str, *, on_310p: bool) -> str:
    """The chip family; ops call it first. Other chips are not emulated; the 310P only where
    the op's docs list the Atlas inference products (``on_310p``)."""
    fam = chip_family()
    if fam == "other" or (fam == "310P" and not on_310p):
        _fail(
            op, f"not supported (or not emulated) on {SOC_NAME}: the docs list Atlas A2/A3 here", RuntimeError
        )
    return fam


# -- storage formats -----------------------------------------------------------------------
# id(storage) -> (weakref to the storage, format). torch keeps one Python object per storage, so
# a view or a ``param.data = t`` assignment finds the same entry; the weakref drops it with the
# storage.
_FORMATS: dict[int, tuple[weakref.ref, int]] = {}


def get_npu_format(tensor: torch.Tensor) -> int:
    """The format of the tensor's storage (ND unless :func:`npu_format_cast` made it)."""
    storage = tensor.untyped_storage()
    entry = _FORMATS.get(id(storage))
    if entry is not None and entry[0]() is storage:
        return entry[1]
    return ACL_FORMAT_ND


def _forget(key: int, ref: weakref.ref) -> None:
    if _FORMATS.get(key, (None,))[0] is ref:
        del _FORMATS[key]


def npu_format_cast(self: torch.Tensor, acl_format: int) -> torch.Tensor:
    """A relayout into a new storage of ``acl_format``; the values (as torch sees them) are unchanged.

    As on hardware, the format belongs to the storage: views of the result and parameters whose
    ``.data`` is set to it report it too.
    """
    if acl_format not in (ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ):
        _fail(
            "npu_format_cast",
            f"format {acl_format} is not emulated (ND=2, FRACTAL_NZ=29)",
            NotImplementedError,
        )
    if acl_format == ACL_FORMAT_FRACTAL_NZ and self.dim() < 2:
        _fail(
            "npu_format_cast", f"FRACTAL_NZ needs a tensor of at least 2 dims, got shape {tuple(self.shape)}"
        )
    out = self.contiguous().clone()
    if acl_format != ACL_FORMAT_ND:
        storage = out.untyped_storage()
        key = id(storage)
        ref = weakref.ref(storage, lambda r, k=key: _forget(k, r))
        _FORMATS[key] = (ref, acl_format)
    return out


# -- int4 packing -------------------------------------------------------------------------
def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """int32 [d0, d1] with values in [-8, 7] -> int32 [d0, d1 / 8], 8 nibbles per word, low first."""
    op = "npu_convert_weight_to_int4pack"
    if weight.dtype != torch.int32:
        _fail(op, f"weight dtype only support int32, but it is {weight.dtype}", TypeError)
    if weight.dim() != 2:
        _fail(op, f"weight shape only support dim num 2, but it is {weight.dim()}")
    if not weight.is_contiguous():
        _fail(op, "weight should be contiguous")
    if get_npu_format(weight) != ACL_FORMAT_ND:
        _fail(op, "FRACTAL_NZ input is not emulated", NotImplementedError)
    if weight.shape[0] == 0 or weight.shape[1] == 0 or weight.shape[1] % INT4_PER_INT32:
        _fail(op, f"weight last dim should be the multiple of 8, but it is {weight.shape[1]}")
    lo, hi = int(weight.min()), int(weight.max())
    if lo < -8 or hi > 7:
        _fail(op, f"values must lie in the int4 range [-8, 7], found [{lo}, {hi}]", ValueError)
    return pack_int4(weight)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7] -> int32 with the last dim / 8: 8 nibbles per word, first value lowest."""
    nib = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], -1, INT4_PER_INT32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nib << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`npu_convert_weight_to_int4pack` along the last dim (int8 values)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nib = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    vals = torch.where(nib >= 8, nib - 16, nib)
    return vals.reshape(*packed.shape[:-1], -1).to(torch.int8)


def _is_transposed_view(t: torch.Tensor) -> bool:
    """The transpose of a contiguous tensor (op-plugin's is_transpose_last_two_dims, 2-D)."""
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.shape[0] and t.shape != (1, 1)


def _int4_weight_values(op: str, weight: torch.Tensor) -> torch.Tensor:
    """[K, N] int8 values of an int32-packed int4 weight given as (K, N/8) or (N, K/8).t()."""
    if _is_transposed_view(weight):
        return unpack_int4pack(weight.t()).t()  # packed along K: (N, K/8) -> (N, K) -> (K, N)
    if not weight.is_contiguous():
        _fail(
            op,
            "an int32 (int4) weight must be contiguous (k, n//8) or the transpose of a contiguous (n, k//8)",
        )
    return unpack_int4pack(weight)


# -- activation quantization ---------------------------------------------------------------
def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales=None, group_index=None, dst_type=None):
    """Symmetric per-token quantization: (round(x / scale), scale = rowMax(|x|) / DTYPE_MAX as float32).

    int8 (``dst_type`` None or int8, DTYPE_MAX 127) or int4 (``torch.quint4x2``, DTYPE_MAX 7; the
    result packed 8 per int32 along the last dim, which must be a multiple of 8).
    """
    op = "npu_dynamic_quant"
    _served_chip(op, on_310p=False)  # docs: Atlas A2/A3 (and Ascend 950) only
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail(op, f"x must be float16 or bfloat16, got {x.dtype}", TypeError)
    if x.dim() < 2:
        _fail(op, f"x must have more than 1 dim, got shape {tuple(x.shape)}")
    if smooth_scales is not None or group_index is not None:
        _fail(op, "smooth_scales / group_index are not emulated", NotImplementedError)
    if dst_type not in (None, torch.int8, torch.quint4x2):
        _fail(op, f"dst_type {dst_type} is not emulated (int8 and quint4x2 only)", NotImplementedError)
    int4 = dst_type == torch.quint4x2
    if int4 and x.shape[-1] % INT4_PER_INT32:
        _fail(op, f"int4 output needs the last dim of x to be a multiple of 8, got {x.shape[-1]}")
    qmax = 7 if int4 else 127
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / float(qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-qmax - 1, qmax)
    if int4:
        return pack_int4(y.to(torch.int32)), scale
    return y.to(torch.int8), scale


# -- norms (what vLLM-Ascend's RMSNorm calls, and the fused norm + quant its compilation pass swaps in) --
def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """(y, rstd, x): x = x1 + x2, rstd = 1 / sqrt(mean(x^2) + epsilon) (float32, last dim 1),
    y = x * rstd * gamma; y and x in x1's dtype (hicann/ops-nn norm/add_rms_norm docs)."""
    op = "npu_add_rms_norm"
    _served_chip(op, on_310p=True)
    if x1.shape != x2.shape or gamma.shape != x1.shape[-1:]:
        _fail(op, f"x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)} and gamma {tuple(gamma.shape)} do not fit")
    x = x1.float() + x2.float()
    rstd = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(x1.dtype), rstd, x.to(x1.dtype)


def npu_add_rms_norm_dynamic_quant(
    x1, x2, gamma, *, smooth_scale1=None, smooth_scale2=None, beta=None, epsilon=1e-6, output_mask=None
):
    """(y1, y2, x, scale1, scale2) of aclnnAddRmsNormDynamicQuant(V2) (hicann/ops-nn
    norm/add_rms_norm_dynamic_quant docs): y as npu_add_rms_norm's, kept in float32, then
    scale1 = row_max(|y|) / 127 and y1 = round(y / scale1) in int8; y2 and scale2 carry nothing
    without smoothScale2 (returned empty). Smoothing scales and beta are not emulated."""
    op = "npu_add_rms_norm_dynamic_quant"
    _served_chip(op, on_310p=False)
    if smooth_scale1 is not None or smooth_scale2 is not None or beta is not None:
        _fail(op, "smooth scales and beta are not emulated", NotImplementedError)
    _, rstd, x = npu_add_rms_norm(x1, x2, gamma, epsilon)
    y = (x1.float() + x2.float()) * rstd * gamma.float()
    scale = y.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y1 = torch.round(y / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y1, y1.new_empty(0), x, scale, scale.new_empty(0)


def npu_kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio=None, dst_dtype=None, dst_type_max=None):
    """Per token (first dim): x'' = P1 @ (x @ P2), scale = max|x''| * clip / 7, int4 packed in int32.

    Mirrors aclnnFlatQuant's A2/A3 kernel: x @ P2 accumulated in float32 and stored in x's dtype,
    P1 @ (..) accumulated in float32 and stored in float16; max|x''| read from that float16 tensor;
    x'' * ((7 / clip) / max) in float32, cast to half (RINT), then to int4 (RINT, saturating).
    Returns (out int32 (K, M, N / 8), quant_scale float32 (K,)).
    """
    op = "npu_kronecker_quant"
    _served_chip(op, on_310p=False)
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail(op, f"x must be float16 or bfloat16, got {x.dtype}", TypeError)
    if x.dim() != 3:
        _fail(op, f"x must be 3-D (K, M, N), got shape {tuple(x.shape)}")
    k, m, n = x.shape
    for name, p, size in (("kronecker_p1", kronecker_p1, m), ("kronecker_p2", kronecker_p2, n)):
        if p.dtype != x.dtype:
            _fail(op, f"{name} must have x's dtype {x.dtype}, got {p.dtype}", TypeError)
        if tuple(p.shape) != (size, size):
            _fail(op, f"{name} must be ({size}, {size}), got {tuple(p.shape)}")
    if not 1 <= k <= KRONECKER_MAX_K:
        _fail(op, f"the first dim of x must lie in [1, {KRONECKER_MAX_K}], got {k}")
    if not (1 <= m <= KRONECKER_MAX_MN and 1 <= n <= KRONECKER_MAX_MN):
        _fail(op, f"the last two dims of x must lie in [1, {KRONECKER_MAX_MN}], got ({m}, {n})")
    if dst_dtype not in (None, torch.int32):
        _fail(op, f"dst_dtype {dst_dtype} is not emulated (int32-packed int4 only)", NotImplementedError)
    if dst_type_max not in (None, 0.0):
        _fail(op, "dst_type_max is only for float4_e2m1fn_x2 output")
    if n % INT4_PER_INT32:
        _fail(op, f"int32 output needs the last dim of x to be a multiple of 8, got {n}")
    clip = 1.0 if clip_ratio is None else float(clip_ratio)
    if not 0.0 < clip <= 1.0:
        _fail(op, f"clip_ratio must lie in (0, 1], got {clip}")
    x1 = torch.matmul(x.float(), kronecker_p2.float()).to(x.dtype)  # cube: fp32 acc -> x's dtype
    x2 = torch.matmul(kronecker_p1.float(), x1.float()).to(torch.float16)  # cube: fp32 acc -> fp16
    max_value = x2.abs().amax(dim=(1, 2)).float()  # exact: a max of float16 values
    clip32 = torch.tensor(clip, dtype=torch.float32)
    seven = torch.tensor(7.0, dtype=torch.float32)
    quant_scale = max_value * clip32 / seven
    factor = torch.where(max_value != 0, (seven / clip32) / max_value, seven)
    v = (x2.float() * factor.reshape(k, 1, 1)).to(torch.float16)  # Muls, Cast f32->f16 (RINT)
    q = torch.round(v.float()).clamp(-8, 7)  # Cast f16->int4 (RINT), saturated (inferred)
    return pack_int4(q.to(torch.int32)), quant_scale


def npu_quantize(input, scales, zero_points, dtype, axis=1, div_mode=True):
    """Per-tensor / per-axis quantization: round(input * scales + zero_points) (div_mode=False)."""
    op = "npu_quantize"
    fam = _served_chip(op, on_310p=True)
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(op, f"input must be float, float16 or bfloat16, got {input.dtype}", TypeError)
    if fam == "310P" and input.dtype == torch.bfloat16:
        _fail(op, f"bfloat16 is not supported on {SOC_NAME} (Atlas inference products)", TypeError)
    if dtype != torch.qint8:
        _fail(op, f"dtype {dtype} is not emulated (torch.qint8 only)", NotImplementedError)
    if div_mode:
        _fail(op, "div_mode=True is not emulated (vLLM-Ascend passes False)", NotImplementedError)
    if axis < -2:
        _fail(op, f"axis must be >= -2 with div_mode=False, got {axis}")
    # div_mode=False: axis -2 is the second-to-last dim, anything larger the last one
    dim = input.dim() - 2 if axis == -2 else input.dim() - 1
    size = input.shape[dim]
    for name, t in (("scales", scales), ("zero_points", zero_points)):
        if t is None:
            if name == "scales":
                _fail(op, "scales must not be None")
            continue
        if t.dtype != input.dtype:
            _fail(
                op,
                f"{name} must have input's dtype {input.dtype} when div_mode=False, got {t.dtype}",
                TypeError,
            )
        if t.dim() != 1 or t.shape[0] not in (1, size):
            _fail(op, f"{name} must be 1-D of size {size} (input dim {dim}) or 1, got shape {tuple(t.shape)}")
    if zero_points is not None and zero_points.shape != scales.shape:
        _fail(op, "zero_points must have the shape of scales")
    view = [1] * input.dim()
    view[dim] = -1
    q = input.float() * scales.float().reshape(view)
    if zero_points is not None:
        q = q + zero_points.float().reshape(view)
    return torch.round(q).clamp(-128, 127).to(torch.int8)


# -- scales --------------------------------------------------------------------------------
_QUANT_PARAM_FLAG = 1 << 46  # npu_trans_quant_param sets bit 46
_FP19_MASK = 0xFFFFE000  # the top 19 bits of a float32: sign, 8 exponent, 10 mantissa bits
_OFFSET_SHIFT = 37  # a 9-bit offset in bits 37..45


def _fp19(scale_f32: torch.Tensor) -> torch.Tensor:
    """float32 truncated to the FP19 the dequant unit reads (sign, 8 exponent, 10 mantissa bits)."""
    bits = scale_f32.contiguous().view(torch.int32) & torch.tensor(-8192, dtype=torch.int32)  # 0xFFFFE000
    return bits.view(torch.float32)


def _check_quant_param_input(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        _fail(op, f"{name} must be float32, got {t.dtype}", TypeError)
    if t.dim() not in (1, 2) or t.numel() == 0:
        _fail(op, f"{name} must be a non-empty 1-D or 2-D tensor, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        _fail(op, f"{name} must be contiguous")


def npu_trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0):
    """float32 scale (and offset) -> the int64 quant parameter of npu_quant_matmul (documented encoding):
    ``(bits(scale) & 0xFFFFE000) | 1 << 46``, an offset as 9 bits at bit 37."""
    op = "npu_trans_quant_param"
    _check_quant_param_input(op, "scale", scale)
    if round_mode not in (0, 1):
        _fail(op, f"round_mode must be 0 (truncate) or 1 (R_INT), got {round_mode}")
    bits = scale.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if round_mode == 1:  # round the 13 dropped bits to nearest, ties to even (inferred from R_INT)
        low = bits & 0x1FFF
        keep = bits >> 13
        up = (low > 0x1000) | ((low == 0x1000) & ((keep & 1) == 1))
        bits = (keep + up.to(torch.int64)) << 13
    out = (bits & _FP19_MASK) | _QUANT_PARAM_FLAG
    if offset is None:
        return out
    _check_quant_param_input(op, "offset", offset)
    off = torch.round(offset).clamp(-256, 255).to(torch.int64)  # half to even, as the ATK golden's np.round
    off_bits = (off & 0x1FF) << _OFFSET_SHIFT
    try:
        out, off_bits = torch.broadcast_tensors(out, off_bits)
    except RuntimeError:
        _fail(op, f"offset of shape {tuple(offset.shape)} does not broadcast with scale {tuple(scale.shape)}")
    if scale.dim() == 2 and tuple(out.shape) != tuple(scale.shape):
        _fail(
            op,
            f"with a 2-D scale the output has its shape {tuple(scale.shape)}, offset {tuple(offset.shape)}",
        )
    return (out & 0x4000FFFFFFFF) | off_bits


def _check_int64_scale(scale: torch.Tensor) -> None:
    if scale.dtype != torch.int64:
        raise TypeError(f"an int64-encoded scale must be int64, got {scale.dtype}")
    bad = (scale < 0) | (scale >= 2**47) | (((scale >> 32) & 0x1F) != 0)
    if bool(bad.any()):
        raise ValueError(
            "int64 scale has bits set outside the low 32 (scale), 37..45 (offset) and 46 (flag): "
            "not a quant-param encoding (use npu_trans_quant_param)"
        )


def decode_int64_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 value the dequant unit reads from an int64 quant parameter: the low 32 bits as FP19.

    Takes npu_trans_quant_param's encoding and a plain float32 bit pattern (bit 46 clear)."""
    _check_int64_scale(scale)
    low = scale & 0xFFFFFFFF
    low32 = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)
    return _fp19(low32.view(torch.float32))


def decode_int64_offset(scale: torch.Tensor) -> torch.Tensor:
    """The 9-bit signed offset (bits 37..45) of an int64 quant parameter, as int64."""
    _check_int64_scale(scale)
    off = (scale >> _OFFSET_SHIFT) & 0x1FF
    return torch.where(off >= 256, off - 512, off)


_F16, _BF16, _F32, _I32, _I64 = torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64
# npu_quant_matmul dtype combinations on Atlas A2/A3 (docs table 2 as the aclnn checkers read it,
# see the module docstring), int8 x int8:
# output dtype -> [(scale dtypes, bias dtypes, pertoken: False / True (optional) / "required", offset)]
_QMM_TABLE = {
    _F16: [
        ({_I64}, {_I32}, False, False),
        ({_F32}, {_I32, _F16, _F32}, "required", False),
    ],
    torch.int8: [({_I64}, {_I32}, False, True)],
    _BF16: [({_F32, _BF16}, {_I32, _BF16, _F32}, True, False)],
    _I32: [({_F32, _BF16}, {_I32}, False, False)],
}
# int32 x int32 (int4) rows of table 2; an empty bias set means bias must be None. The pertoken row's
# offset column reads "float16" in the docs (a 2-D-scale case): offset is not emulated here.
_QMM_TABLE_INT4 = {
    _F16: [
        ({_I64}, {_I32}, False, False),
        ({_F32}, set(), "required", False),
    ],
    _BF16: [({_F32}, set(), "required", False)],
}
# table 1, Atlas inference products (310P): int8 only, no pertoken_scale, no bfloat16
_QMM_TABLE_310P = {
    _F16: [({_I64}, {_I32}, False, False)],
    torch.int8: [({_I64}, {_I32}, False, True)],
}


def _int4_operands(op: str, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values of int32-packed int4 operands: x1 (m, k/8) contiguous -> [m, k]; x2 (k, n/8)
    contiguous or the transpose of a contiguous (n, k/8) -> [k, n] (docs' int4 constraints)."""
    if x1.dim() != 2 or x2.dim() != 2:
        _fail(op, "batched int4 operands are not emulated (2-D only)", NotImplementedError)
    if not x1.is_contiguous():
        _fail(op, "an int32 (int4) x1 must be a contiguous (m, k//8)")
    if get_npu_format(x2) != ACL_FORMAT_ND:
        _fail(op, "FRACTAL_NZ int4 weights are not emulated (vLLM-Ascend keeps them ND)", NotImplementedError)
    return unpack_int4pack(x1), _int4_weight_values(op, x2)


def npu_quant_matmul(
    x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, group_sizes=None
):
    """int8 x int8 (or int4 x int4, packed 8 per int32) -> int32 accumulate -> dequant:
    ``(x1 @ x2 [+ int32 bias]) * scale [* pertoken] [+ float bias]`` (docs formula; pertoken as in
    the grouped-matmul docs' formula 3)."""
    op = "npu_quant_matmul"
    fam = _served_chip(op, on_310p=True)
    out_dtype = torch.int8 if output_dtype is None else output_dtype
    int4 = x1.dtype == torch.int32 and x2.dtype == torch.int32
    if fam == "310P":
        if torch.int32 in (x1.dtype, x2.dtype):
            _fail(
                op,
                f"int4 (int32-packed) operands are not supported on {SOC_NAME} (docs: int8 only)",
                TypeError,
            )
        if pertoken_scale is not None:
            _fail(op, f"pertoken_scale is not supported on {SOC_NAME} (Atlas inference products)")
        if get_npu_format(x2) != ACL_FORMAT_FRACTAL_NZ:
            _fail(op, f"x2 must be FRACTAL_NZ on {SOC_NAME} (aclnn CheckFormat for ASCEND310P)")
    if not int4 and torch.int32 in (x1.dtype, x2.dtype):
        _fail(op, "mixed int8 / int32 operands (A8W4) are not emulated", NotImplementedError)
    if not int4 and (x1.dtype != torch.int8 or x2.dtype != torch.int8):
        _fail(op, f"x1 and x2 must both be int8 (or both int32), got {x1.dtype} and {x2.dtype}", TypeError)
    if group_sizes is not None:
        _fail(op, "group_sizes is only for A8W4, which is not emulated", NotImplementedError)
    if not 2 <= x1.dim() <= 6 or not 2 <= x2.dim() <= 6:
        _fail(op, f"x1/x2 must have 2 to 6 dims, got {x1.dim()} and {x2.dim()}")
    if get_npu_format(x1) != ACL_FORMAT_ND:
        _fail(op, "x1 must be ND")
    if x1.shape[-1] > MAX_KN or x2.shape[-1] > MAX_KN:
        _fail(
            op,
            f"the last dims of x1 and x2 must not exceed {MAX_KN}, got {x1.shape[-1]} and {x2.shape[-1]}",
        )
    a, b = _int4_operands(op, x1, x2) if int4 else (x1, x2)  # int8 values [.., m, k], [.., k, n]
    k, n = b.shape[-2], b.shape[-1]
    m = a.shape[-2]
    if a.shape[-1] != k:
        _fail(op, f"K of x1 ({a.shape[-1]}) and x2 ({k}) differ: x2 must be laid out [k, n]")
    # dtype combination
    table = _QMM_TABLE_310P if fam == "310P" else (_QMM_TABLE_INT4 if int4 else _QMM_TABLE)
    rows = table.get(out_dtype)
    if rows is None:
        _fail(op, f"output_dtype {output_dtype} is not supported here ({SOC_NAME})", TypeError)
    if scale.dtype == torch.float32 and pertoken_scale is None and out_dtype in (torch.float16, torch.int8):
        _fail(
            op,
            f"a float32 scale with {out_dtype} output and no pertoken_scale is refused by aclnnQuantMatmul "
            "('scale dtype should not be FLOAT') and in graph mode (docs); only op-plugin's eager adapter "
            "converts it. Pass the int64 of torch_npu.npu_trans_quant_param(scale) instead",
            TypeError,
        )
    ok = any(
        scale.dtype in s
        and (bias is None or bias.dtype in b_dtypes)
        and (pertoken_scale is not None if p == "required" else pertoken_scale is None or p)
        and (offset is None or o)
        for s, b_dtypes, p, o in rows
    )
    if not ok:
        _fail(
            op,
            f"unsupported dtype combination: scale {scale.dtype}, "
            f"bias {None if bias is None else bias.dtype}, "
            f"pertoken_scale {None if pertoken_scale is None else pertoken_scale.dtype}, offset "
            f"{None if offset is None else offset.dtype}, output_dtype {out_dtype}",
            TypeError,
        )
    if pertoken_scale is not None and pertoken_scale.dtype != torch.float32:
        _fail(op, f"pertoken_scale must be float32, got {pertoken_scale.dtype}", TypeError)
    if offset is not None and offset.dtype != torch.float32:
        _fail(op, f"offset must be float32, got {offset.dtype}", TypeError)
    # shapes
    if scale.dim() != 1 or scale.shape[0] not in (1, n):
        _fail(op, f"scale must be 1-D of size 1 or n={n}, got shape {tuple(scale.shape)}")
    if offset is not None and (offset.dim() != 1 or offset.shape[0] not in (1, n)):
        _fail(op, f"offset must be 1-D of size 1 or n={n}, got shape {tuple(offset.shape)}")
    if pertoken_scale is not None and (pertoken_scale.dim() != 1 or pertoken_scale.shape[0] != m):
        _fail(op, f"pertoken_scale must be 1-D of size m={m}, got shape {tuple(pertoken_scale.shape)}")
    if bias is not None and not (
        (bias.dim() == 1 and bias.shape[0] == n) or (bias.dim() == 3 and bias.shape[1:] == (1, n))
    ):
        _fail(op, f"bias must be (n,) or (batch, 1, n) with n={n}, got shape {tuple(bias.shape)}")
    # int32 accumulation (exact in float64: |sum| <= 2^14 * 65535 < 2^53)
    acc = torch.matmul(a.double(), b.double())
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.double()
    quant_offset = offset
    if scale.dtype == torch.int64:
        s = decode_int64_scale(scale)
        packed_offset = decode_int64_offset(scale)
        if bool((packed_offset != 0).any()):
            if out_dtype != torch.int8:
                _fail(op, "an int64 scale with an offset (npu_trans_quant_param's offset) is for int8 output")
            if quant_offset is None:
                quant_offset = packed_offset.float()
    else:
        s = scale.float()
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    out = acc.float() * s
    if pertoken_scale is not None:
        out = out * pertoken_scale.float().unsqueeze(-1)
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.float()
    if quant_offset is not None:
        out = out + quant_offset.float()
    if out_dtype == torch.int8:
        return torch.round(out).clamp(-128, 127).to(torch.int8)
    return out.to(out_dtype)


def npu_weight_quant_batchmatmul(
    x,
    weight,
    antiquant_scale,
    antiquant_offset=None,
    quant_scale=None,
    quant_offset=None,
    bias=None,
    antiquant_group_size=0,
    inner_precise=0,
):
    """``x @ ((weight + antiquant_offset) * antiquant_scale) + bias`` with int8 / int4 weights.

    The dequantized weight enters the cube in x's dtype (rounded once there); the matmul
    accumulates in float32 and the result is rounded to x's dtype.
    """
    op = "npu_weight_quant_batchmatmul"
    fam = _served_chip(op, on_310p=True)
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail(op, f"x must be float16 or bfloat16, got {x.dtype}", TypeError)
    if fam == "310P" and (x.dtype != torch.float16 or weight.dtype != torch.int8):
        _fail(op, f"{SOC_NAME} takes float16 x and int8 weights only (docs)", TypeError)
    if x.dim() != 2:
        _fail(op, f"x must be 2-D (m, k), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        _fail(op, f"weight must be 2-D (k, n), got shape {tuple(weight.shape)}")
    if get_npu_format(weight) == ACL_FORMAT_FRACTAL_NZ:
        if fam == "310P":
            _fail(op, "FRACTAL_NZ weights are not emulated for the 310P (there: (n, k) layout, graph mode)")
        if weight.dtype != torch.int8:
            _fail(op, "FRACTAL_NZ int32 (int4) weights are not emulated", NotImplementedError)
        if int(antiquant_group_size):
            _fail(
                op,
                "a FRACTAL_NZ int8 weight takes per-tensor / per-channel antiquant only "
                "(aclnnWeightQuantBatchMatmulV2: NZ per-group needs int4/int32 weights)",
            )
    if quant_scale is not None or quant_offset is not None:
        _fail(op, "quant_scale / quant_offset (int8 output) are not emulated", NotImplementedError)
    if weight.dtype == torch.int8:
        w = weight
    elif weight.dtype == torch.int32:
        w = _int4_weight_values(op, weight)
    else:
        _fail(op, f"weight must be int8 or int32 (int4-packed), got {weight.dtype}", TypeError)
    k, n = w.shape
    if x.shape[1] != k:
        _fail(op, f"K of x ({x.shape[1]}) and weight ({k}) differ: weight must be laid out [k, n]")
    if not (1 <= k <= MAX_KN and 1 <= n <= MAX_KN):
        _fail(op, f"k and n must lie in [1, {MAX_KN}], got k={k}, n={n}")
    if antiquant_scale.dtype == torch.int64:
        _fail(op, "int64 antiquant_scale (fp16 per-channel fast path) is not emulated", NotImplementedError)
    if antiquant_scale.dtype != x.dtype:
        _fail(op, f"antiquant_scale must have x's dtype {x.dtype}, got {antiquant_scale.dtype}", TypeError)
    gs = int(antiquant_group_size)
    if gs:
        if gs % 32 or not 32 <= gs <= k - 1:
            _fail(op, f"antiquant_group_size must be a multiple of 32 in [32, k-1={k - 1}], got {gs}")
        groups = -(-k // gs)
        if tuple(antiquant_scale.shape) != (groups, n):
            _fail(
                op,
                f"per-group antiquant_scale must be (ceil(k/group)={groups}, n={n}), "
                f"got {tuple(antiquant_scale.shape)}",
            )
        s = antiquant_scale.float().repeat_interleave(gs, dim=0)[:k]
    else:
        shape = tuple(antiquant_scale.shape)
        if shape not in ((1,), (1, 1), (n,), (1, n)):
            _fail(op, f"antiquant_scale must be (1,), (1, 1), (n,) or (1, n) with n={n}, got {shape}")
        s = antiquant_scale.float().reshape(1, -1)
    off = None
    if antiquant_offset is not None:
        if antiquant_offset.dtype != antiquant_scale.dtype:
            _fail(
                op,
                f"antiquant_offset must have antiquant_scale's dtype {antiquant_scale.dtype}, "
                f"got {antiquant_offset.dtype}",
                TypeError,
            )
        if antiquant_offset.shape != antiquant_scale.shape:
            _fail(op, "antiquant_offset must have the shape of antiquant_scale")
        off = antiquant_offset.float()
        off = off.repeat_interleave(gs, dim=0)[:k] if gs else off.reshape(1, -1)
    want_bias = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
    if bias is not None:
        if bias.dtype != want_bias:
            _fail(op, f"bias must be {want_bias} for x of {x.dtype}, got {bias.dtype}", TypeError)
        if tuple(bias.shape) not in ((n,), (1, n)) or not bias.is_contiguous():
            _fail(op, f"bias must be a contiguous (n,) or (1, n) with n={n}, got shape {tuple(bias.shape)}")
    wf = w.float()
    if off is not None:
        wf = wf + off
    w_deq = (wf * s).to(x.dtype)  # what the cube reads
    out = x.float() @ w_deq.float()
    if bias is not None:
        out = out + bias.float().reshape(1, -1)
    return out.to(x.dtype)
