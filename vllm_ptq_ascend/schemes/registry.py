"""Plans -> schemes: the one list of every scheme, asked in order which one ``matches`` a plan.

A new scheme is one file in this folder and one line here.
"""

from __future__ import annotations

from vllm_ptq_ascend.formats.plan import LayerPlan
from vllm_ptq_ascend.schemes.base import PtqScheme
from vllm_ptq_ascend.schemes.flatquant import FlatQuantScheme
from vllm_ptq_ascend.schemes.msmodelslim_flatquant import ModelSlimFlatQuant, ModelSlimFlatQuantW4A8
from vllm_ptq_ascend.schemes.msmodelslim_w4a8 import ModelSlimW4A8Dynamic
from vllm_ptq_ascend.schemes.msmodelslim_w8a8 import ModelSlimW8A8, ModelSlimW8A8Dynamic
from vllm_ptq_ascend.schemes.msmodelslim_weight_only import ModelSlimWeightOnly
from vllm_ptq_ascend.schemes.w4a4_int import W4A4IntScheme
from vllm_ptq_ascend.schemes.w4a8_int import W4A8IntScheme
from vllm_ptq_ascend.schemes.w8a8_int8 import W8A8Int8Scheme
from vllm_ptq_ascend.schemes.wna16 import WNA16Scheme

SCHEMES: tuple[type[PtqScheme], ...] = (
    # compressed-tensors
    W8A8Int8Scheme,
    W4A8IntScheme,
    W4A4IntScheme,
    WNA16Scheme,
    FlatQuantScheme,
    # msModelSlim
    ModelSlimW8A8,
    ModelSlimW8A8Dynamic,
    ModelSlimWeightOnly,
    ModelSlimW4A8Dynamic,
    ModelSlimFlatQuant,
    ModelSlimFlatQuantW4A8,
)


def scheme_class(plan: LayerPlan) -> type[PtqScheme]:
    """The one scheme that serves ``plan``; a plan no scheme (or two) serves is a bug, not bad input."""
    found = [cls for cls in SCHEMES if cls.matches(plan)]
    if len(found) != 1:
        names = ", ".join(cls.__name__ for cls in found) or "none"
        raise LookupError(f"{len(found)} schemes serve the {plan.format} plan {plan.scheme!r} ({names})")
    return found[0]


def build_scheme(plan: LayerPlan, layer_name: str, files: dict[str, str], shards: list[str]) -> PtqScheme:
    """The scheme serving ``plan`` for one (possibly fused) layer."""
    return scheme_class(plan)(layer_name, files=files, shards=shards, **plan.settings)
