"""FlatQuant's learnable pieces for one decoder block, differentiable end to end.

A :class:`TrainableTransform` per group of linears that share an input: Kronecker factors L, R
(:class:`KroneckerFactor`: identity, random-orthogonal or random-Hadamard at the start, learned directly or as
U·diag·Vᵀ with Cayley-orthogonal U, V; the left one block-diagonal for a row-parallel layer served
at tensor parallelism, :class:`BlockDiagonalFactor`), a per-channel smoothing scale s (where a norm can absorb
it) and an activation clipping ratio; a :class:`FlatQuantLinear` per linear: the folded weight
(W·s)·P⁻ᵀ fake-quantized with a learnable per-output-channel clipping ratio. Rounding uses
the straight-through estimator. Weights are quantized on compressed-tensors' grid
(scale = max/((2^b - 1)/2), what the QuantizationModifier that follows writes); activations on
the serving kernels' grid (scale = clip·max/(2^(b-1) - 1), see kernels/base.IntDynamicSpec).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix
from loguru import logger
from torch import nn

from vllm_ptq_ascend.formats.kronecker import fold_into_value_rows, kronecker_transform, layer_factor_sizes

CLIP_INIT_LOGIT = 4.0  # sigmoid(4) = 0.982, FlatQuant's initial clipping ratio
INITS = ("identity", "random-orthogonal", "hadamard")
PARAMETRIZATIONS = ("direct", "svd-cayley")


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference's initial factor (ruikangliu/FlatQuant ``function_utils.get_random_orthg``):
    Q of the QR decomposition of a standard normal matrix, columns signed so R's diagonal is
    positive (the unique such Q: Haar-distributed), in float64."""
    return orthogonal_from(torch.randn(n, n, generator=generator, dtype=torch.float64))


def random_hadamard(n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """A random Hadamard factor, as QuIP and SpinQuant rotate with: compressed-tensors'
    ``random_hadamard_matrix`` (a Hadamard matrix times a random ±1 diagonal), scaled by 1/sqrt(n) to
    be orthogonal, in float64; None where no Hadamard matrix of order n is known (n = 2^k·m with m in
    compressed-tensors' table: multiples of 4 up to 256). The Kronecker product of two such factors is
    itself a Hadamard matrix of their product's order, so L ⊗ R starts as a full random-Hadamard
    rotation of the layer's input, every channel mixed with equal weight."""
    state = None if generator is None else generator.get_state()
    try:
        h = random_hadamard_matrix(n, torch.float64, gen=generator)
    except ValueError:
        if state is not None:  # it drew the signs before refusing: the fallback draws as if it had not
            generator.set_state(state)
        return None
    return h / math.sqrt(n)


def start_matrix(n: int, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A factor's initial matrix (float64): ``hadamard`` falls back to a random-orthogonal draw for
    orders with no known Hadamard matrix (SmolLM2's 9 attention heads), and says so in the log."""
    if init == "identity":
        return torch.eye(n, dtype=torch.float64)
    if init == "hadamard":
        h = random_hadamard(n, generator)
        if h is not None:
            return h
        _say_no_hadamard(n)
    return random_orthogonal(n, generator)


@functools.cache
def _say_no_hadamard(n: int) -> None:
    logger.info(
        f"FlatQuant: no Hadamard matrix of order {n} is known; factors of that size start random-orthogonal"
    )


def orthogonal_from(h: torch.Tensor) -> torch.Tensor:
    """Q of h = QR with R's diagonal made positive."""
    q, r = torch.linalg.qr(h)
    return q * torch.sign(torch.diagonal(r))


class KroneckerFactor(nn.Module):
    """One Kronecker factor M, learned either directly ("direct": the matrix itself, its inverse
    transpose by inversion) or as the reference's default ``SVDDecomposeTransMatrix`` ("svd-cayley":
    M = U·diag(d)·Vᵀ with U, V kept orthogonal by torch's Cayley parametrization and d starting at
    ones, so M⁻ᵀ = U·diag(1/d)·Vᵀ needs no inversion)."""

    def __init__(self, n: int, init: str, parametrization: str, generator: torch.Generator | None = None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"FlatQuant init must be one of {', '.join(INITS)}, got {init!r}")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"FlatQuant parametrization must be one of {', '.join(PARAMETRIZATIONS)}, "
                f"got {parametrization!r}"
            )
        self.parametrization = parametrization

        def start() -> torch.Tensor:
            return start_matrix(n, init, generator).float()

        if parametrization == "direct":
            self.m = nn.Parameter(start())
            return
        self.u, self.v = nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False)
        for lin in (self.u, self.v):
            lin.weight.data = start()
            nn.utils.parametrizations.orthogonal(lin, orthogonal_map="cayley", use_trivialization=False)
        self.d = nn.Parameter(torch.ones(n))

    def matrix(self) -> torch.Tensor:
        if self.parametrization == "direct":
            return self.m
        return self.u.weight @ torch.diag(self.d) @ self.v.weight.t()

    def inverse_t(self) -> torch.Tensor:
        if self.parametrization == "direct":
            return torch.linalg.inv(self.m).t()
        return self.u.weight @ torch.diag(1 / self.d) @ self.v.weight.t()


class BlockDiagonalFactor(nn.Module):
    """A factor learned as ``blocks`` independent diagonal blocks (zeros elsewhere), so that each of
    that many tensor-parallel ranks of a row-parallel layer applies its own block to its input slice."""

    def __init__(
        self, n: int, blocks: int, init: str, parametrization: str, generator: torch.Generator | None = None
    ):
        super().__init__()
        if blocks < 1 or n % blocks:
            raise ValueError(f"a Kronecker factor of size {n} cannot be split into {blocks} diagonal blocks")
        self.blocks = nn.ModuleList(
            KroneckerFactor(n // blocks, init, parametrization, generator) for _ in range(blocks)
        )

    def matrix(self) -> torch.Tensor:
        return torch.block_diag(*(b.matrix() for b in self.blocks))

    def inverse_t(self) -> torch.Tensor:
        return torch.block_diag(*(b.inverse_t() for b in self.blocks))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_activations(x: torch.Tensor, bits: int, clip: torch.Tensor, slices: int = 1) -> torch.Tensor:
    """Per token, and per each of ``slices`` equal slices of it (what each row-parallel rank quantizes)."""
    qmax = 2 ** (bits - 1) - 1
    xs = x.reshape(*x.shape[:-1], slices, x.shape[-1] // slices)
    scale = (xs.abs().amax(dim=-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
    return (torch.clamp(round_ste(xs / scale), -qmax - 1, qmax) * scale).reshape(x.shape)


def fake_quant_weight(w: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel, range clipped to ``clip`` of each row's max."""
    scale = (w.abs().amax(dim=1, keepdim=True) * clip.reshape(-1, 1) / ((2**bits - 1) / 2)).clamp(min=1e-8)
    return torch.clamp(round_ste(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


class TrainableTransform(nn.Module):
    def __init__(
        self,
        n: int,
        act_bits: int,
        smooth_init: torch.Tensor | None,
        act_clip: bool,
        init: str = "identity",
        parametrization: str = "direct",
        generator: torch.Generator | None = None,
        rank_slices: int = 1,
        head_dim: int | None = None,
    ):
        """``rank_slices`` > 1: a row-parallel layer served at that tensor-parallel size, whose ranks
        each hold one slice of the input; the left factor is learned block-diagonal over them and the
        activations are quantized per slice, as the ranks quantize them.
        ``head_dim``: o_proj's per-head transform, L over the heads and R within each head; R is applied
        upstream, by v_proj (``FlatQuantLinear(value_heads=...)``), so online only L ⊗ I runs."""
        super().__init__()
        n1, n2 = layer_factor_sizes(n, head_dim)
        self.right_upstream = head_dim is not None
        self.act_bits = act_bits
        self.rank_slices = rank_slices
        self.left_factor = (
            KroneckerFactor(n1, init, parametrization, generator)
            if rank_slices == 1
            else BlockDiagonalFactor(n1, rank_slices, init, parametrization, generator)
        )
        self.right_factor = KroneckerFactor(n2, init, parametrization, generator)
        self.log_smooth = None
        if smooth_init is not None:
            self.log_smooth = nn.Parameter(smooth_init.float().clamp(min=1e-5).log())
        self.clip_logit = nn.Parameter(torch.tensor(CLIP_INIT_LOGIT), requires_grad=act_clip)
        if not act_clip:
            self.clip_logit.data.fill_(30.0)  # sigmoid = 1: no clipping

    @property
    def left(self) -> torch.Tensor:
        return self.left_factor.matrix()

    @property
    def right(self) -> torch.Tensor:
        return self.right_factor.matrix()

    def factor_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains for the factors (the transform's learning rate)."""
        return [*self.left_factor.parameters(), *self.right_factor.parameters()]

    def smooth(self) -> torch.Tensor | None:
        return None if self.log_smooth is None else self.log_smooth.exp()

    def clip_ratio(self) -> torch.Tensor:
        return torch.sigmoid(self.clip_logit)

    def activations(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """x transformed and fake-quantized per token to ``bits`` (this transform's by default: a layer
        served at another width, as under a mixed-precision budget, passes its own)."""
        s = self.smooth()
        if s is not None:
            x = x / s
        # a right factor applied upstream has already transformed x within each head
        right = None if self.right_upstream else self.right
        return fake_quant_activations(
            kronecker_transform(x, self.left, right),
            bits or self.act_bits,
            self.clip_ratio(),
            self.rank_slices,
        )

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        s = self.smooth()
        if s is not None:
            w = w * s
        return kronecker_transform(w, self.left_factor.inverse_t(), self.right_factor.inverse_t())


class FlatQuantLinear(nn.Module):
    """Stands in for one nn.Linear of the block while its transform is trained."""

    def __init__(
        self,
        linear: nn.Linear,
        transform: TrainableTransform,
        weight_bits: int,
        weight_clip: bool,
        value_heads: TrainableTransform | None = None,
        act_bits: int | None = None,
    ):
        """``value_heads``: v_proj, whose output heads carry o_proj's per-head right factor (folded
        into its weight rows and bias, and quantized so). ``act_bits``: this layer's activation width,
        if not its transform's."""
        super().__init__()
        self.value_heads = value_heads
        self.act_bits = act_bits
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
        xq = self.transform.activations(x.float(), self.act_bits)
        w, b = self.transform.weight(self.w), self.b
        if self.value_heads is not None:
            w, b = fold_into_value_rows(w, b, self.value_heads.right)
        wq = fake_quant_weight(w, self.weight_bits, self.clip_ratio())
        return F.linear(xq, wq, b).to(x.dtype)
