"""compressed-tensors' ``quantization_config`` -> a plan per config group.

The config is parsed with compressed-tensors' own pydantic types. Each config group is planned
once (so an unsupported group fails at start-up, naming the group); ``serving.config`` then
matches each linear layer to a group by vLLM's own target/ignore matching.
"""

from __future__ import annotations

from typing import Any

from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization import (
    QuantizationConfig as CTQuantizationConfig,
)
from pydantic import ValidationError

from vllm_ptq_ascend import QUANT_METHOD
from vllm_ptq_ascend.formats.plan import CT_FORMAT, LayerPlan
from vllm_ptq_ascend.formats.transforms import parse_transform_config
from vllm_ptq_ascend.validation import CheckpointError

CT_METHOD = "compressed-tensors"
INT_QUANTIZED = "int-quantized"
PACK_QUANTIZED = "pack-quantized"
SUPPORTED_FORMATS = (INT_QUANTIZED, PACK_QUANTIZED)


def is_marked(hf_quant_cfg: dict[str, Any] | None) -> bool:
    """True for a checkpoint written by our recipes (they add a ``ptq_ascend`` block)."""
    return isinstance(hf_quant_cfg, dict) and isinstance(hf_quant_cfg.get(QUANT_METHOD), dict)


def _lift_group_actorder(config: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """compressed-tensors 0.19 rejects actorder "group"/"dynamic" (older GPTQ checkpoints);
    we serve them from their ``weight_g_idx``, so take the flag out before validation."""
    lifted: set[str] = set()
    groups = {}
    if not isinstance(config.get("config_groups"), dict):
        return config, lifted  # compressed-tensors' validation reports it
    for name, group in config["config_groups"].items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and weights.get("actorder") in ("group", "dynamic"):
            group = {**group, "weights": {**weights, "actorder": None}}
            lifted.add(name)
        groups[name] = group
    return ({**config, "config_groups": groups} if lifted else config), lifted


def plan_group(
    name: str,
    weights: QuantizationArgs | None,
    acts: QuantizationArgs | None,
    fmt: str,
    has_g_idx: bool = False,
) -> LayerPlan | None:
    """Plan one config group, or raise naming the group and what is unsupported."""
    if weights is None:
        return None
    where = f"config.json: quantization_config.config_groups['{name}']"
    if fmt not in SUPPORTED_FORMATS:
        raise CheckpointError(
            f"{where}: format {fmt!r} is not supported by {QUANT_METHOD} "
            f"(supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    if weights.type != QuantizationType.INT:
        raise CheckpointError(
            f"{where}: weight type {str(getattr(weights.type, 'value', weights.type))!r}; "
            "only int is supported"
        )
    strategy = weights.strategy
    if acts is not None:
        int8_acts = acts.type == QuantizationType.INT and acts.num_bits == 8
        dynamic_token = (
            acts.dynamic is True and acts.strategy == QuantizationStrategy.TOKEN and acts.symmetric
        )
        w8a8 = (
            weights.num_bits == 8
            and weights.symmetric
            and strategy in (QuantizationStrategy.CHANNEL, QuantizationStrategy.TENSOR)
            and int8_acts
            and (dynamic_token or (acts.dynamic is False and acts.strategy == QuantizationStrategy.TENSOR))
            and fmt == INT_QUANTIZED
        )
        w4a4 = (
            weights.num_bits == 4
            and weights.symmetric
            and strategy == QuantizationStrategy.CHANNEL
            and not has_g_idx
            and acts.type == QuantizationType.INT
            and acts.num_bits == 4
            and dynamic_token
        )
        if w4a4:
            return _plan(name, "W4A4", packed=fmt == PACK_QUANTIZED)
        w4a8 = (
            weights.num_bits == 4
            and weights.symmetric
            and strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
            and not has_g_idx
            and int8_acts
            and dynamic_token
        )
        if w4a8:
            group_size = weights.group_size if strategy == QuantizationStrategy.GROUP else None
            return _plan(name, "W4A8", group_size=group_size, packed=fmt == PACK_QUANTIZED)
        if not w8a8:
            raise CheckpointError(
                f"{where}: weights {_args(weights)} with activations {_args(acts)} "
                f"(format {fmt}{', act-order g_idx' if has_g_idx else ''}) is not a supported scheme; "
                "supported: W8A8 int8 (int-quantized; symmetric per-channel/per-tensor weights; "
                "per-token dynamic or per-tensor static activations), W4A4 int (int-quantized or "
                "pack-quantized; symmetric int4 channel weights; int4 per-token dynamic symmetric "
                "activations), W4A8 int (int-quantized or "
                "pack-quantized; symmetric int4 group or channel weights; int8 per-token dynamic "
                "symmetric activations), W4A16/W8A16 (pack-quantized, group or channel)"
            )
        return _plan(
            name,
            "W8A8",
            weight_per_channel=strategy == QuantizationStrategy.CHANNEL,
            static_input=not acts.dynamic,
            input_symmetric=bool(acts.symmetric),
        )
    if fmt != PACK_QUANTIZED or strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL):
        raise CheckpointError(
            f"{where}: weight-only {_args(weights)} in format {fmt!r} is not supported; "
            "weight-only layers must be pack-quantized with group or channel scales"
        )
    if weights.num_bits not in (4, 8):
        raise CheckpointError(f"{where}: {weights.num_bits}-bit weights; supported: 4, 8")
    return _plan(
        name,
        "WNA16",
        num_bits=weights.num_bits,
        group_size=weights.group_size if strategy == QuantizationStrategy.GROUP else None,
        symmetric=bool(weights.symmetric),
        act_order=has_g_idx,  # actorder "weight"/"static" store no g_idx
    )


def _group_failing(config: dict[str, Any], error: type[Exception]) -> str:
    """A prefix naming the first group whose validation raises ``error`` (config_groups['g']: ), or ''."""
    from compressed_tensors.quantization import QuantizationScheme

    groups = config.get("config_groups")
    for name, group in (groups if isinstance(groups, dict) else {}).items():
        try:
            QuantizationScheme.model_validate(group)
        except error:
            return f"config_groups[{name!r}]: "
        except Exception:
            continue
    return ""


def parse_ct_config(config: dict[str, Any]) -> tuple[CTQuantizationConfig, dict[str, Any], set[str]]:
    """(compressed-tensors config, the dict it was read from, groups with act-order g_idx)."""
    config, g_idx_groups = _lift_group_actorder(config)
    try:
        ct = CTQuantizationConfig.model_validate({k: v for k, v in config.items() if k != QUANT_METHOD})
    except Exception as e:  # pydantic's message lists each bad field
        # compressed-tensors' own validators can fail on a field of the wrong type before
        # pydantic checks it (a TypeError such as "'<' not supported between 'str' and 'int'")
        why = e
        if not isinstance(e, ValidationError):
            why = f"{_group_failing(config, type(e))}a field has a value of the wrong type ({e})"
        raise CheckpointError(
            f"config.json: quantization_config is not valid compressed-tensors: {why}"
        ) from e
    return ct, config, g_idx_groups


def plan_groups(
    ct: CTQuantizationConfig, g_idx_groups: set[str], errors: list[CheckpointError] | None = None
) -> dict[str, LayerPlan | None]:
    """A plan per config group; raises on the first unsupported one, or (with ``errors``)
    collects every error and leaves those groups out (``inspect`` reports them all)."""
    plans = {}
    for name, group in ct.config_groups.items():
        fmt = getattr(group, "format", None) or ct.format
        try:
            plans[name] = plan_group(name, group.weights, group.input_activations, fmt, name in g_idx_groups)
        except CheckpointError as e:
            if errors is None:
                raise
            errors.append(e)
    return plans


def servable_by_us(hf_quant_cfg: dict[str, Any]) -> bool:
    """True if every config group and the transform_config plan cleanly."""
    try:
        ct, _, g_idx_groups = parse_ct_config(hf_quant_cfg)
        plan_groups(ct, g_idx_groups)
        parse_transform_config(hf_quant_cfg.get("transform_config"))
    except CheckpointError:
        return False
    return True


def _args(a: QuantizationArgs) -> str:
    return a.model_dump_json(include={"num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"})


def flatquant_plan(
    plan: LayerPlan | None, transform: str, prefix: str, head_dim: int | None = None
) -> LayerPlan:
    """The plan of a layer with a FlatQuant input transform: its group must quantize activations
    per token at run time and weights per channel (the transform mixes channels). ``head_dim``: a
    per-head transform (formats/kronecker.py ``layer_factor_sizes``)."""
    options = plan.settings if plan else {}
    bits = None
    if plan is not None and plan.scheme == "W4A4":
        bits = (4, 4)
    elif plan is not None and plan.scheme == "W4A8" and options.get("group_size") is None:
        bits = (4, 8)
    elif (
        plan is not None
        and plan.scheme == "W8A8"
        and options["weight_per_channel"]
        and not options["static_input"]
    ):
        bits = (8, 8)
    if bits is None:
        what = f"config group {plan.source!r}" if plan else "no quantization config group (unquantized)"
        raise CheckpointError(
            f"config.json: layer '{prefix}' has a FlatQuant input transform ({transform!r}) but {what}; "
            "a transformed layer needs symmetric per-channel int4/int8 weights and int4/int8 per-token "
            "dynamic activations (W4A4, W4A8, W8A8)"
        )
    return _plan(
        plan.source,
        "FlatQuant",
        weight_bits=bits[0],
        act_bits=bits[1],
        packed=bool(options.get("packed", False)),
        transform_group=transform,
        **({"head_dim": head_dim} if head_dim else {}),
    )


def _plan(group: str, scheme: str, **options) -> LayerPlan:
    return LayerPlan(CT_FORMAT, scheme, tuple(options.items()), source=group)
