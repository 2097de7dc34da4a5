"""The checkpoint's ``transform_config`` -> which layers get FlatQuant's online transform.

compressed-tensors' QuantizationConfig ignores ``transform_config``, so it is read here.
A transform applied only to weights (locations ``weight_input`` / ``weight_output``: SpinQuant's
R1 and R2 as llmcompressor writes them) is already fused into the stored weights, so it needs
nothing at serve time and is accepted. An online transform of another type (Hadamard rotations of
layer inputs or outputs: QuIP, SpinQuant R3/R4) is refused by name rather than dropped, since
serving the rotated weights without their online half gives wrong outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
    find_matched_target,
    should_ignore_layer,
)

from vllm_ptq_ascend.kronecker import TRANSFORM_TYPE
from vllm_ptq_ascend.validation import CheckpointError

WHERE = "config.json: quantization_config.transform_config"
# where a transform is applied to the weight when the checkpoint is written (compressed-tensors
# fuses it: TransformFactory._apply_to_module) rather than to activations at run time
WEIGHT_LOCATIONS = ("weight_input", "weight_output")


@dataclass(frozen=True)
class TransformPlan:
    group: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]


def parse_transform_config(raw: dict[str, Any] | None) -> list[TransformPlan]:
    """One plan per (group, apply entry); empty when the checkpoint has no transforms."""
    if not raw:
        return []
    from compressed_tensors.transform import TransformConfig

    try:
        config = TransformConfig.model_validate(raw)
    except Exception as e:
        raise CheckpointError(f"{WHERE} is not a valid compressed-tensors transform config: {e}") from e
    plans = []
    for group, scheme in config.config_groups.items():
        if all(args.location in WEIGHT_LOCATIONS for args in scheme.apply):
            continue  # fused into the checkpoint's weights when it was saved
        if scheme.type != TRANSFORM_TYPE:
            online = sorted(
                {
                    str(getattr(a.location, "value", a.location))
                    for a in scheme.apply
                    if a.location not in WEIGHT_LOCATIONS
                }
            )
            raise CheckpointError(
                f"{WHERE}.config_groups[{group!r}]: online {'/'.join(online)} transform of type "
                f"{scheme.type!r} is not served by ptq_ascend (served: transforms fused into the weights, "
                f"and online {TRANSFORM_TYPE!r} input transforms); serve this checkpoint with "
                "--quantization compressed-tensors"
            )
        for args in scheme.apply:
            if args.location != "input" or args.inverse:
                raise CheckpointError(
                    f"{WHERE}.config_groups[{group!r}]: {TRANSFORM_TYPE!r} applies to layer inputs only "
                    f"(got location {args.location!r}, inverse={args.inverse})"
                )
            plans.append(TransformPlan(group, tuple(args.targets), tuple(args.ignore)))
    return plans


def transform_group_for(
    plans: list[TransformPlan], shards: list[str], layer: torch.nn.Module, prefix: str
) -> str | None:
    """The transform group whose input transform applies to this (possibly fused) layer."""
    per_shard = {}
    for shard in shards:
        per_shard[shard] = None
        for plan in plans:
            if should_ignore_layer(shard, ignore=list(plan.ignore)):
                continue
            if find_matched_target(shard, layer, list(plan.targets)) is not None:
                per_shard[shard] = plan.group
                break
    groups = set(per_shard.values())
    if len(groups) > 1:
        detail = ", ".join(f"{s} -> {g or 'none'}" for s, g in per_shard.items())
        raise CheckpointError(
            f"{WHERE}: fused layer '{prefix}' has an input transform on some shards only ({detail}); "
            "its shards read one input"
        )
    return groups.pop()
