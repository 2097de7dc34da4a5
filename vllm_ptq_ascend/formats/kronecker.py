"""FlatQuant's online Kronecker transform, and its compressed-tensors transform type.

A linear layer with input x [.., n] gets an invertible P = L ⊗ R (L [n1, n1], R [n2, n2],
n1·n2 = n): the activations are transformed online, x -> x·P = vec(Lᵀ·X·R) with X the row
viewed as [n1, n2], and clipped per token to ``clip_ratio`` of their max; the inverse is
folded into the weight offline, W -> W·P⁻ᵀ (in float64), so x·Wᵀ = (x·P)·(W·P⁻ᵀ)ᵀ.
Only the two factors are stored, never the dense n×n matrix.

Checkpoints carry the transform in compressed-tensors' ``transform_config`` with the type
:data:`TRANSFORM_TYPE`, registered here with compressed-tensors' ``TransformFactory``, so
``apply_transform_config`` attaches it to a transformers model (whose loader ignores
``transform_config``): each targeted layer gets a submodule ``<group>_input`` holding
``left``, ``right`` and ``clip_ratio``, saved as ``<layer>.<group>_input.left`` etc.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.transform import TransformArgs, TransformLocation
from compressed_tensors.transform.factory.base import TransformBase, TransformFactory
from torch import nn

TRANSFORM_TYPE = "flatquant-kronecker"
TRANSFORM_TENSORS = ("left", "right", "clip_ratio")
# transform_config groups FlatQuantModifier writes: every layer's, and o_proj's per-head one
TRANSFORM_GROUP, HEADS_GROUP = "flatquant", "flatquant_heads"
# inverting a factor worse conditioned than this loses the float32 activations' precision
MAX_CONDITION = 1e6


def kronecker_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` [M, n1*n2] times L ⊗ R, without forming it: vec(L^T · X · R), X = row as [n1, n2].
    ``right`` None: the identity, whose product is skipped (o_proj's per-head transform online)."""
    n1 = left.shape[0]
    x3 = x.reshape(-1, n1, x.shape[-1] // n1)
    if right is not None:
        x3 = x3 @ right
    return (left.t() @ x3).reshape(x.shape)


def factor_sizes(n: int) -> tuple[int, int]:
    """(n1, n2) with n1·n2 = n and n1 <= n2 as close to √n as possible (FlatQuant's choice)."""
    if n < 1:
        raise ValueError(f"cannot factor a transform of size {n}")
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def layer_factor_sizes(n: int, head_dim: int | None = None) -> tuple[int, int]:
    """A layer's factor sizes: FlatQuant's nearest-square pair, or (n / head_dim, head_dim) for a
    per-head transform (compressed-tensors' ``TransformScheme.head_dim``: o_proj, whose right factor
    acts within each attention head and is folded into v_proj, so only the left one runs online)."""
    if head_dim is None:
        return factor_sizes(n)
    if head_dim < 1 or n % head_dim:
        raise ValueError(f"a per-head transform of size {n} needs a head_dim dividing it, got {head_dim}")
    return n // head_dim, head_dim


def check_factors(left: torch.Tensor, right: torch.Tensor, in_features: int, where: str) -> None:
    """Square factors whose sizes multiply to ``in_features``, finite and invertible; else ValueError."""
    for name, t in (("left", left), ("right", right)):
        if t.dim() != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(f"{where}: Kronecker factor '{name}' must be square, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: Kronecker factor '{name}' holds NaN or infinite values")
    if left.shape[0] * right.shape[0] != in_features:
        raise ValueError(
            f"{where}: Kronecker factors of sizes {left.shape[0]} and {right.shape[0]} give a transform "
            f"of size {left.shape[0] * right.shape[0]}, but the layer has {in_features} inputs"
        )
    for name, t in (("left", left), ("right", right)):
        cond = torch.linalg.cond(t.double()).item()
        if not math.isfinite(cond) or cond > MAX_CONDITION:
            raise ValueError(
                f"{where}: Kronecker factor '{name}' is singular or nearly so (condition number {cond:.3g}; "
                f"at most {MAX_CONDITION:.0e} is accepted)"
            )


def _off_blocks(n: int, blocks: int) -> torch.Tensor:
    """Mask of an n x n matrix's entries outside its ``blocks`` equal diagonal blocks."""
    owner = torch.arange(n) // (n // blocks)
    return owner[:, None] != owner[None, :]


def diagonal_blocks(left: torch.Tensor) -> int:
    """The most equal diagonal blocks ``left`` splits into with exact zeros outside them: the largest
    tensor-parallel size whose ranks each apply their own block of a row-parallel layer's transform."""
    n = left.shape[0]
    for blocks in range(n, 1, -1):
        if n % blocks == 0 and not bool(left[_off_blocks(n, blocks)].any()):
            return blocks
    return 1


def diagonal_block(left: torch.Tensor, index: int, blocks: int, where: str) -> torch.Tensor:
    """Block ``index`` of ``left`` split into ``blocks`` diagonal blocks: what a row-parallel rank,
    which holds only its slice of the rows of X, applies. ValueError unless every entry outside those
    blocks is zero (the rank's transform would need inputs that other ranks hold)."""
    n = left.shape[0]
    if n % blocks:
        raise ValueError(
            f"{where}: the left Kronecker factor ({n} x {n}) cannot be split into {blocks} diagonal blocks, "
            "one per tensor-parallel rank"
        )
    if blocks > 1:
        outside = left[_off_blocks(n, blocks)]
        if bool(outside.any()):
            raise ValueError(
                f"{where}: the left Kronecker factor is not block-diagonal over {blocks} tensor-parallel "
                f"ranks (largest entry outside the diagonal blocks: {float(outside.abs().max()):.3g}; it "
                f"splits into at most {diagonal_blocks(left)} blocks). Quantize with --tp {blocks}, or "
                "serve with a tensor_parallel_size its blocks allow"
            )
    b = n // blocks
    return left[index * b : (index + 1) * b, index * b : (index + 1) * b]


def transform_activations(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, clip_ratio
) -> torch.Tensor:
    """x·(L ⊗ R), then each row clamped to ±clip_ratio·max|row| (FlatQuant's activation clipping)."""
    y = kronecker_transform(x, left, right)
    bound = y.abs().amax(dim=-1, keepdim=True) * clip_ratio
    return torch.maximum(torch.minimum(y, bound), -bound)


def fold_into_weight(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """W·diag(s)·P⁻ᵀ in float64 (the offline half of the transform), returned in float64.

    ``smooth`` s is a per-input-channel scale whose inverse the activations carry (folded into
    the preceding norm), as SmoothQuant; rows of W are transformed like activations by
    (L⁻¹)ᵀ ⊗ (R⁻¹)ᵀ = P⁻ᵀ.
    """
    w = weight.double()
    if smooth is not None:
        w = w * smooth.double()
    inv_l = torch.linalg.inv(left.double())
    inv_r = torch.linalg.inv(right.double())
    return kronecker_transform(w, inv_l.t(), inv_r.t())


def fold_into_value_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v_proj's weight and bias with o_proj's per-head right factor R folded in: each head's output v
    becomes v·R (rows Rᵀ·W_h, bias b_h·R). Attention mixes each head's values linearly, so o_proj's
    input arrives as x·(I ⊗ R) and only its left factor runs online."""
    n2 = right.shape[0]
    w = (right.t() @ weight.reshape(-1, n2, weight.shape[-1])).reshape(weight.shape)
    return w, None if bias is None else (bias.reshape(-1, n2) @ right).reshape(bias.shape)


class KroneckerTransform(TransformBase):
    """One layer's online input transform: ``left``, ``right`` and the activation ``clip_ratio``."""

    _dynamic_tied_weights_keys: list[str] = []

    def __init__(
        self,
        in_features: int,
        args: TransformArgs,
        dtype: torch.dtype = torch.float32,
        head_dim: int | None = None,
    ):
        super().__init__()
        n1, n2 = layer_factor_sizes(in_features, head_dim)
        self.args = args
        self.left = nn.Parameter(torch.eye(n1, dtype=dtype), requires_grad=False)
        self.right = nn.Parameter(torch.eye(n2, dtype=dtype), requires_grad=False)
        self.clip_ratio = nn.Parameter(torch.ones(1, dtype=dtype), requires_grad=False)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        y = transform_activations(value.to(self.left.dtype), self.left, self.right, self.clip_ratio)
        return y.to(value.dtype)


@TransformFactory.register(TRANSFORM_TYPE)
class KroneckerFactory(TransformFactory):
    """Identity factors for every targeted layer's input; calibration or a checkpoint fills them."""

    def create_transform(self, module: nn.Module, args: TransformArgs) -> KroneckerTransform:
        if args.location != TransformLocation.INPUT or args.inverse:
            raise ValueError(
                f"transform type {TRANSFORM_TYPE!r} applies to layer inputs only "
                f"(got location {args.location!r}, inverse={args.inverse}); its inverse goes into the weight"
            )
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"transform type {TRANSFORM_TYPE!r} targets Linear layers, not {type(module).__name__}"
            )
        return KroneckerTransform(
            module.in_features, args, dtype=self.scheme.precision, head_dim=self.scheme.head_dim
        )


def transform_config(
    targets: list[str], group: str = TRANSFORM_GROUP, per_head: list[str] = (), head_dim: int | None = None
):
    """The compressed-tensors TransformConfig attaching our transform to ``targets``' inputs, and a
    per-head one (factors of sizes n / head_dim and head_dim) to ``per_head``'s, as :data:`HEADS_GROUP`."""
    from compressed_tensors.transform import TransformConfig, TransformScheme

    groups = {
        group: TransformScheme(type=TRANSFORM_TYPE, apply=[TransformArgs(targets=targets, location="input")])
    }
    if per_head:
        groups[HEADS_GROUP] = TransformScheme(
            type=TRANSFORM_TYPE,
            apply=[TransformArgs(targets=list(per_head), location="input")],
            head_dim=head_dim,
        )
    return TransformConfig(config_groups=groups)
