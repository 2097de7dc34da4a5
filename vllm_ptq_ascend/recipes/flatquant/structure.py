"""Which linear layers of a decoder block share one FlatQuant transform (they read one input).

The block structure comes from the model's family (``recipes/families.py``): q/k/v after the
family's attention norm (``input_layernorm``), ``o_proj``, gate/up after the norm that feeds the
MLP (``post_attention_layernorm`` in Llama-style blocks, ``pre_feedforward_layernorm`` in Gemma2),
``down_proj``. A per-channel smoothing scale is learned where something upstream can absorb its
inverse: a norm before the group (folded with :func:`fold_into_norm`, right for the norm's
parametrisation as it stands: x̂·w, or x̂·(1 + w), measured on the module; inside ``oneshot``
llmcompressor holds Gemma's (1 + w) norms as x̂·w' with w' = 1 + w), and, for down_proj, up_proj's
output rows, since down_proj reads act(gate)·up (:func:`divide_rows`; the reference's
``down_trans.diag_scale``, folded into up_proj by ``FlatQuantLlamaMLP.reparameterize``). o_proj gets
the transform and clipping alone, as in the reference: its input is attention's output, whose
value heads grouped-query attention shares between query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_ptq_ascend.formats.kronecker import layer_factor_sizes
from vllm_ptq_ascend.recipes.families import (
    DOWN_PROJ,
    GATE_UP,
    O_PROJ,
    QKV,
    UP_PROJ,
    Family,
    effective_offset,
    fold_scale_into_norm,
)


def family_groups(family: Family) -> tuple[tuple[tuple[str, ...], str | None], ...]:
    """(linears relative to the block, the norm before them or None), in the block's order."""
    return (
        (QKV, family.attn_norm),
        ((O_PROJ,), None),
        (GATE_UP, family.mlp_norm),
        ((DOWN_PROJ,), None),
    )


@dataclass
class LinearGroup:
    names: tuple[str, ...]  # relative to the block
    linears: list[nn.Linear]
    norm: nn.Module | None  # has a .weight of the linears' input size
    norm_name: str | None = None  # the norm's full name
    norm_offset: float = 0.0  # the norm computes x̂·(norm_offset + w)
    head_dim: int | None = None  # o_proj's per-head transform: L over the heads, R within each
    #: the linear whose output rows absorb the smoothing scale's inverse (up_proj for down_proj)
    smooth_rows_of: nn.Linear | None = None

    @property
    def smoothable(self) -> bool:
        return self.norm is not None or self.smooth_rows_of is not None

    @property
    def factor_sizes(self) -> tuple[int, int]:
        return layer_factor_sizes(self.in_features, self.head_dim)

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def row_parallel(self) -> bool:
        """vLLM splits this group's input over tensor-parallel ranks (RowParallelLinear)."""
        return self.names in ((O_PROJ,), (DOWN_PROJ,))


def block_groups(
    block: nn.Module,
    block_name: str,
    family: Family,
    per_head_o_proj: bool = False,
    smooth_down_proj: bool = False,
) -> list[LinearGroup]:
    """The transform groups of one decoder block; raises naming what the block lacks.
    ``per_head_o_proj``: o_proj's transform per attention head (its right factor folded into v_proj).
    ``smooth_down_proj``: down_proj's smoothing folded into up_proj's rows, where the family's MLP is
    act(gate)·up (``Family.up_down_fold``)."""
    groups = []
    for names, norm_name in family_groups(family):
        linears = []
        for name in names:
            module = block.get_submodule(name) if _has(block, name) else None
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"FlatQuant: block '{block_name}' ({type(block).__name__}) has no Linear '{name}'; "
                    "supported are blocks with self_attn.q/k/v/o_proj and mlp.gate/up/down_proj"
                )
            linears.append(module)
        if len({m.in_features for m in linears}) != 1:
            raise ValueError(f"FlatQuant: '{block_name}' {names} differ in input size")
        norm = block.get_submodule(norm_name) if norm_name and _has(block, norm_name) else None
        if norm is not None and getattr(norm, "weight", None) is None:
            norm = None
        full = f"{block_name}.{norm_name}" if norm is not None else None
        # inside oneshot llmcompressor holds Gemma's (1 + w) norms as x̂·w' (families.effective_offset)
        offset = effective_offset(norm, full, family) if norm is not None else 0.0
        head_dim = _head_dim(block, block_name) if per_head_o_proj and names == (O_PROJ,) else None
        rows_of = None
        if smooth_down_proj and family.up_down_fold and names == (DOWN_PROJ,):
            rows_of = block.get_submodule(UP_PROJ)
        groups.append(LinearGroup(names, linears, norm, full, offset, head_dim, rows_of))
    return groups


def _head_dim(block: nn.Module, block_name: str) -> int:
    head_dim = getattr(block.get_submodule(O_PROJ.rpartition(".")[0]), "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(
            f"FlatQuant: block '{block_name}' ({type(block).__name__}) has no attention head_dim, which a "
            "per-head o_proj transform needs"
        )
    return head_dim


def fold_into_norm(group: LinearGroup, smooth: torch.Tensor) -> torch.Tensor:
    """The group's norm weight (in its dtype) after dividing its effective scale by ``smooth``:
    w / s for x̂·w, (1 + w) / s - 1 for x̂·(1 + w)."""
    return fold_scale_into_norm(group.norm.weight, smooth, group.norm_offset).to(group.norm.weight.dtype)


def divide_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output rows (and bias) of the linear upstream of a smoothed input divided by ``scale``: the next
    layer's input x / s then comes out of the model as it stands. Per-row, so it commutes with
    per-output-channel clipping and quantization."""
    s = scale.to(weight.dtype).reshape(-1, 1)
    return weight / s, None if bias is None else bias / s.reshape(-1)


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False
