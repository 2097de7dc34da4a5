"""Which linear layers of a decoder block share one FlatQuant transform (they read one input).

Llama-style blocks (Llama, Qwen2/2.5/3, Mistral, SmolLM2, openPangu-Embedded, DeepSeek-R1-Distill):
q/k/v after ``input_layernorm``, ``o_proj``, gate/up after ``post_attention_layernorm``,
``down_proj``. The per-channel smoothing scale is learned only where a norm precedes the
group (its inverse is folded into the norm's weight); o_proj and down_proj get the
Kronecker transform and clipping alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# (linears relative to the block, the norm before them or None)
GROUPS = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    (("self_attn.o_proj",), None),
    (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    (("mlp.down_proj",), None),
)


@dataclass
class LinearGroup:
    names: tuple[str, ...]  # relative to the block
    linears: list[nn.Linear]
    norm: nn.Module | None  # has a .weight of the linears' input size

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features


def block_groups(block: nn.Module, block_name: str) -> list[LinearGroup]:
    """The transform groups of one decoder block; raises naming what the block lacks."""
    groups = []
    for names, norm_name in GROUPS:
        linears = []
        for name in names:
            module = block.get_submodule(name) if _has(block, name) else None
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"FlatQuant: block '{block_name}' ({type(block).__name__}) has no Linear '{name}'; "
                    "supported are Llama-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)"
                )
            linears.append(module)
        if len({m.in_features for m in linears}) != 1:
            raise ValueError(f"FlatQuant: '{block_name}' {names} differ in input size")
        norm = block.get_submodule(norm_name) if norm_name and _has(block, norm_name) else None
        if norm is not None and getattr(norm, "weight", None) is None:
            norm = None
        groups.append(LinearGroup(names, linears, norm))
    return groups


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False
