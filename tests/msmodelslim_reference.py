"""Float64 msModelSlim-format quantizers, FlatQuant reference helpers and config builders shared by the
tests/formats/test_msmodelslim*.py files: tensors in the layout msModelSlim's savers write, the float64
dequantized weights and quantized activations a served layer must equal, and PtqAscendConfig instances
built from hand-written quant_model_description.json contents.
"""

from __future__ import annotations

import math

import torch

from tests.reference import quant_per_token


# -- quantizers (float64), msModelSlim conventions: q = round(x / s + offset), x = (q - offset) * s
def _asym(w: torch.Tensor, bits: int, group: int | None):
    out_f, in_f = w.shape
    g = w.reshape(out_f, -1, group or in_f)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
    zp = torch.round(qmin - lo / s).clamp(qmin, qmax)
    q = (torch.round(g / s[..., None]) + zp[..., None]).clamp(qmin, qmax)
    deq = ((q - zp[..., None]) * s[..., None]).reshape(out_f, in_f)
    return q.reshape(out_f, in_f).to(torch.int8), s, zp, deq


def _sym8(w: torch.Tensor):
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    q = torch.round(w / s).clamp(-128, 127)
    return q.to(torch.int8), s, q * s


def pack_int4_along_out(q: torch.Tensor) -> torch.Tensor:
    """msmodelslim w4a8_pack_int4 / per-group _w4a16_pack_int4: pairs of rows, low nibble = even row."""
    q = q.to(torch.int16)
    return ((q[1::2] << 4) | (q[0::2] & 0xF)).to(torch.uint8).view(torch.int8)


def _stage_w4(w: torch.Tensor, group: int):
    """msModelSlim W4A8_DYNAMIC weights: per group, float -> int8 per channel (s1) -> int4 per group
    (s2), both symmetric; per channel (group 0, ascendV1): float -> int4 per channel (s1), s2 None."""
    if not group:
        s1 = (w.abs().amax(1, keepdim=True) / 7).clamp(min=1e-8)
        return torch.round(w / s1).clamp(-8, 7).to(torch.int8), s1, None
    s1 = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)
    w8 = torch.round(w / s1).clamp(-127, 127)
    g = w8.reshape(w.shape[0], -1, group)
    s2 = (g.abs().amax(-1) / 7).clamp(min=1e-6)
    q = torch.round(g / s2[..., None]).clamp(-8, 7).reshape(w.shape)
    return q.to(torch.int8), s1, s2


def w4a8_scale_bias(name: str, q, s1, s2):
    """msmodelslim process_scale(name, q * s2 * s1, 16), with the legacy saver's bfloat16 scales."""
    scale = s1.to(torch.bfloat16).float()
    if s2 is not None:
        scale = scale * s2.to(torch.bfloat16).float().repeat_interleave(q.shape[1] // s2.shape[1], 1)
    deq = q.float() * scale
    cols = 16 if any(k in name for k in ("down_proj", "o_proj")) else 1
    return 8 * deq.reshape(q.shape[0], cols, -1).sum(-1)


# -- FlatQuant (schemes/msmodelslim_flatquant.py) ------------------------------------------------------
FQ_BITS = {
    "W4A4_FLATQUANT_DYNAMIC": (4, 4),
    "W8A8_FLATQUANT_DYNAMIC": (8, 8),
    "W4A8_FLATQUANT_DYNAMIC": (4, 8),
}


def fq_sizes(n: int) -> tuple[int, int]:
    """msModelSlim's get_decompose_dim (flat_quant_utils/utils.py): n = (a - b)(a + b), smallest a."""
    a = math.isqrt(n) + (math.isqrt(n) ** 2 < n)
    while math.isqrt(a * a - n) ** 2 != a * a - n:
        a += 1
    b = math.isqrt(a * a - n)
    return a - b, a + b


def fq_factor(n: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned, far-from-identity invertible factor (float64)."""
    return (
        torch.eye(n, dtype=torch.float64)
        + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    )


def fq_dense(left: torch.Tensor, right: torch.Tensor | None, in_f: int) -> torch.Tensor:
    """The dense n x n transform left ⊗ right (right None: the identity, as for o_proj)."""
    right = torch.eye(in_f // left.shape[0], dtype=torch.float64) if right is None else right
    return torch.kron(left.double().contiguous(), right.double().contiguous())


def flatquant_act(x: torch.Tensor, *, left, right, bits: int, clip: float) -> torch.Tensor:
    """The activation msModelSlim calibrated: x · (left ⊗ right), clipped and quantized per token."""
    return quant_per_token(x.double() @ fq_dense(left, right, x.shape[-1]), bits, clip)


def flatquant_tensors(label: str, w: torch.Tensor, left, right, clip: float, name: str = "down_proj"):
    """One layer as msModelSlim's ascendV1 saver writes it (on_flat_clip_wrapper over the wrapped layer's
    handler): the weight folded with the inverse transform, W · P^-T, quantized per channel symmetric;
    and the float64 dequantized weight the served layer must equal."""
    wbits = FQ_BITS[label][0]
    folded = w.double() @ torch.linalg.inv(fq_dense(left, right, w.shape[1])).t()
    qmax = (1 << (wbits - 1)) - 1
    s = (folded.abs().amax(1, keepdim=True) / qmax).clamp(min=1e-8).float()
    q = torch.round(folded / s.double()).clamp(-qmax - 1, qmax).to(torch.int8)
    t = {
        "weight": pack_int4_along_out(q) if label == "W4A8_FLATQUANT_DYNAMIC" else q,
        "weight_scale": s,
        "weight_offset": torch.zeros_like(s),
    }
    if label == "W4A8_FLATQUANT_DYNAMIC":
        t["scale_bias"] = w4a8_scale_bias(name, q, s, None)
    t["left_trans"] = left.float()
    if right is not None:
        t["right_trans"] = right.float()
    t["clip_ratio"] = torch.tensor([clip], dtype=torch.float32)
    return t, q.double() * s.double()


# -- config builders (hand-written quant_model_description.json) -------------------------------------
def _config(desc):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    c = PtqAscendConfig.from_config(
        {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0, **desc}
    )
    c.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    return c


ATTN = "model.layers.0.self_attn"
DOWN = "model.layers.0.mlp.down_proj"


def _desc_config(desc):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    return PtqAscendConfig.from_config({"model_quant_type": "W4A8_DYNAMIC", **desc})
