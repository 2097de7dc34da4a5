"""The checkpoint's ``transform_config`` -> which layers get FlatQuant's online transform.

compressed-tensors' QuantizationConfig ignores ``transform_config``, so it is read here;
a transform of another type (vLLM's Hadamard rotations, ...) is refused rather than dropped,
since serving the rotated weights without their online half gives wrong outputs.
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
        if scheme.type != TRANSFORM_TYPE:
            raise CheckpointError(
                f"{WHERE}.config_groups[{group!r}]: transform type {scheme.type!r} is not served "
                f"by ptq_ascend (supported: {TRANSFORM_TYPE!r}); serve Hadamard-rotated checkpoints with "
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
