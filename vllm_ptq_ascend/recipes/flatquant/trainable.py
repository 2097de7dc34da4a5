"""FlatQuant's learnable pieces for one decoder block, differentiable end to end.

A :class:`TrainableTransform` per group of linears that share an input: Kronecker factors L, R
(identity at the start), a per-channel smoothing scale s (where a norm can absorb it) and an
activation clipping ratio; a :class:`FlatQuantLinear` per linear: the folded weight
(W·s)·P⁻ᵀ fake-quantized with a learnable per-output-channel clipping ratio. Rounding uses
the straight-through estimator. Weights are quantized on compressed-tensors' grid
(scale = max/((2^b - 1)/2), what the QuantizationModifier that follows writes); activations on
the serving kernels' grid (scale = clip·max/(2^(b-1) - 1), see kernels/base.IntDynamicSpec).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_ptq_ascend.kernels.torch_ops import kronecker_transform
from vllm_ptq_ascend.kronecker import factor_sizes

CLIP_INIT_LOGIT = 4.0  # sigmoid(4) = 0.982, FlatQuant's initial clipping ratio


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_activations(x: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale


def fake_quant_weight(w: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel, range clipped to ``clip`` of each row's max."""
    scale = (w.abs().amax(dim=1, keepdim=True) * clip.reshape(-1, 1) / ((2**bits - 1) / 2)).clamp(min=1e-8)
    return torch.clamp(round_ste(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


class TrainableTransform(nn.Module):
    def __init__(self, n: int, act_bits: int, smooth_init: torch.Tensor | None, act_clip: bool):
        super().__init__()
        n1, n2 = factor_sizes(n)
        self.act_bits = act_bits
        self.left = nn.Parameter(torch.eye(n1))
        self.right = nn.Parameter(torch.eye(n2))
        self.log_smooth = None
        if smooth_init is not None:
            self.log_smooth = nn.Parameter(smooth_init.float().clamp(min=1e-5).log())
        self.clip_logit = nn.Parameter(torch.tensor(CLIP_INIT_LOGIT), requires_grad=act_clip)
        if not act_clip:
            self.clip_logit.data.fill_(30.0)  # sigmoid = 1: no clipping

    def smooth(self) -> torch.Tensor | None:
        return None if self.log_smooth is None else self.log_smooth.exp()

    def clip_ratio(self) -> torch.Tensor:
        return torch.sigmoid(self.clip_logit)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        s = self.smooth()
        if s is not None:
            x = x / s
        return fake_quant_activations(
            kronecker_transform(x, self.left, self.right), self.act_bits, self.clip_ratio()
        )

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        s = self.smooth()
        if s is not None:
            w = w * s
        inv_l, inv_r = torch.linalg.inv(self.left), torch.linalg.inv(self.right)
        return kronecker_transform(w, inv_l.t(), inv_r.t())


class FlatQuantLinear(nn.Module):
    """Stands in for one nn.Linear of the block while its transform is trained."""

    def __init__(self, linear: nn.Linear, transform: TrainableTransform, weight_bits: int, weight_clip: bool):
        super().__init__()
        self.original = [linear]  # a list: not a submodule, so not trained or moved
        self.register_buffer("w", linear.weight.detach().float().clone())
        self.register_buffer("b", None if linear.bias is None else linear.bias.detach().float().clone())
        self.transform = transform
        self.weight_bits = weight_bits
        self.clip_logit = nn.Parameter(
            torch.full((linear.out_features,), CLIP_INIT_LOGIT if weight_clip else 30.0),
            requires_grad=weight_clip,
        )

    def clip_ratio(self) -> torch.Tensor:
        return torch.sigmoid(self.clip_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.transform.activations(x.float())
        wq = fake_quant_weight(self.transform.weight(self.w), self.weight_bits, self.clip_ratio())
        return F.linear(xq, wq, self.b).to(x.dtype)
