"""The checkpoint's ``transform_config`` -> which layers get an online transform.

compressed-tensors' QuantizationConfig ignores ``transform_config``, so it is read here.
- A transform applied only to weights (locations ``weight_input`` / ``weight_output``: SpinQuant's
  R1 and R2 as llmcompressor writes them) is already fused into the stored weights: nothing to do.
- FlatQuant's Kronecker input transforms (:data:`TRANSFORM_TYPE`) -> :class:`TransformPlan` per group.
- Online Hadamard rotations of linear inputs or outputs (llmcompressor's QuIP) are kept as
  compressed-tensors' own ``TransformConfig``, which vLLM's ``get_linear_transform_schemes`` reads
  per layer (``serving/online_transforms.py`` serves them).
Anything else online (rotations inside attention: SpinQuant R3/R4; permuted or non-Hadamard
matrices) is refused by name rather than dropped, since serving rotated weights without their
online half gives wrong outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
    find_matched_target,
    should_ignore_layer,
)

from vllm_ptq_ascend.formats.kronecker import TRANSFORM_TYPE
from vllm_ptq_ascend.validation import CheckpointError, agreed_by_shards

WHERE = "config.json: quantization_config.transform_config"
# where a transform is applied to the weight when the checkpoint is written (compressed-tensors
# fuses it: TransformFactory._apply_to_module) rather than to activations at run time
WEIGHT_LOCATIONS = ("weight_input", "weight_output")
# online rotations served by serving/online_transforms.py: their matrices hold ±1 entries, exact in any
# dtype vLLM loads them in ("random-matrix" ones are not, and need their float64 inverse)
ROTATION_TYPES = ("hadamard", "random-hadamard")
ROTATION_LOCATIONS = ("input", "output")


@dataclass(frozen=True)
class TransformPlan:
    group: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    head_dim: int | None = None  # a per-head transform: factors of n / head_dim and head_dim


@dataclass(frozen=True)
class CheckpointTransforms:
    """The online transforms of a checkpoint: FlatQuant plans, and compressed-tensors' rotations."""

    flatquant: tuple[TransformPlan, ...] = ()
    rotations: Any = None  # compressed_tensors.transform.TransformConfig of the online rotation groups

    def __bool__(self) -> bool:
        return bool(self.flatquant) or self.rotations is not None


def location_name(args) -> str:
    """A TransformArgs' location as text (compressed-tensors keeps it an enum or a string)."""
    return str(getattr(args.location, "value", args.location))


def parse_transform_config(raw: dict[str, Any] | None) -> CheckpointTransforms:
    """The online transforms; empty when the checkpoint has none (or only weight-fused ones)."""
    if not raw:
        return CheckpointTransforms()
    from compressed_tensors.transform import TransformConfig

    try:
        config = TransformConfig.model_validate(raw)
    except Exception as e:
        raise CheckpointError(f"{WHERE} is not a valid compressed-tensors transform config: {e}") from e
    plans, rotations = [], {}
    for group, scheme in config.config_groups.items():
        if all(args.location in WEIGHT_LOCATIONS for args in scheme.apply):
            continue  # fused into the checkpoint's weights when it was saved
        if scheme.type != TRANSFORM_TYPE:
            _check_rotation(group, scheme)
            rotations[group] = scheme
            continue
        for args in scheme.apply:
            if args.location != "input" or args.inverse:
                raise CheckpointError(
                    f"{WHERE}.config_groups[{group!r}]: {TRANSFORM_TYPE!r} applies to layer inputs only "
                    f"(got location {args.location!r}, inverse={args.inverse})"
                )
            plans.append(TransformPlan(group, tuple(args.targets), tuple(args.ignore), scheme.head_dim))
    if plans and rotations:
        raise CheckpointError(
            f"{WHERE}: FlatQuant transforms ({', '.join(sorted({p.group for p in plans}))}) and online "
            f"rotations ({', '.join(rotations)}) in one checkpoint are not served by ptq_ascend"
        )
    rotation_config = config.model_copy(update={"config_groups": rotations}) if rotations else None
    return CheckpointTransforms(tuple(plans), rotation_config)


def _check_rotation(group: str, scheme) -> None:
    """An online compressed-tensors transform serving/online_transforms.py serves, or CheckpointError."""
    where = f"{WHERE}.config_groups[{group!r}]"
    online = sorted({location_name(a) for a in scheme.apply if a.location not in WEIGHT_LOCATIONS})
    served = (
        f"served: transforms fused into the weights, online {'/'.join(ROTATION_TYPES)} rotations of "
        f"linear inputs and outputs, and {TRANSFORM_TYPE!r} input transforms"
    )
    if scheme.type not in ROTATION_TYPES:
        raise CheckpointError(
            f"{where}: online {'/'.join(online)} transform of type {scheme.type!r} is not served by "
            f"ptq_ascend ({served})"
        )
    inside = [loc for loc in online if loc not in ROTATION_LOCATIONS]
    if inside:
        raise CheckpointError(
            f"{where}: online {'/'.join(inside)} rotation (inside attention, as SpinQuant's R3/R4) is not "
            f"served by ptq_ascend ({served})"
        )
    if scheme.randomize:
        raise CheckpointError(
            f"{where}: randomize=true (a permuted Hadamard per layer) is not served by ptq_ascend, nor by "
            "vLLM's compressed-tensors transforms, which ignore the permutation"
        )


def transform_plan_for(
    plans: list[TransformPlan], shards: list[str], layer: torch.nn.Module, prefix: str
) -> TransformPlan | None:
    """The transform group whose input transform applies to this (possibly fused) layer."""
    per_shard = {}
    for shard in shards:
        per_shard[shard] = None
        for plan in plans:
            if should_ignore_layer(shard, ignore=list(plan.ignore)):
                continue
            if find_matched_target(shard, layer, list(plan.targets)) is not None:
                per_shard[shard] = plan
                break
    problem = f"{WHERE}: fused layer '{prefix}' has an input transform on some shards only"
    return agreed_by_shards(per_shard, problem, "its shards read one input")
