"""``ptq_ascend``: a compressed-tensors checkpoint -> one scheme per linear layer.

The checkpoint's ``quantization_config`` is parsed with compressed-tensors' own
pydantic types. Each config group is turned into a scheme plan once (so an
unsupported group fails at start-up, naming the group); each linear layer is
then matched to a group by vLLM's own target/ignore matching (exact names,
``re:`` patterns, module class names), shard by shard for fused layers, which
must agree.

msModelSlim checkpoints (no ``quantization_config``; a ``quant_model_description.json``
that vLLM reads through :meth:`PtqAscendConfig.get_config_filenames`) are parsed by
``msmodelslim.py``; :meth:`PtqAscendConfig.from_config` dispatches on the dict it gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization import (
    QuantizationConfig as CTQuantizationConfig,
)
from pydantic import ValidationError
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
    find_matched_target,
    should_ignore_layer,
)

from vllm_ptq_ascend import QUANT_METHOD
from vllm_ptq_ascend.formats.transforms import (
    CheckpointTransforms,
    parse_transform_config,
    transform_group_for,
)
from vllm_ptq_ascend.msmodelslim import DESCRIPTION_FILE, ModelSlimDescription, is_description
from vllm_ptq_ascend.schemes import (
    FlatQuantScheme,
    PtqScheme,
    W4A4IntScheme,
    W4A8IntScheme,
    W8A8Int8Scheme,
    WNA16Scheme,
)
from vllm_ptq_ascend.validation import CheckpointError, tensor_file_index

logger = logging.getLogger(__name__)

CT_METHOD = "compressed-tensors"
INT_QUANTIZED = "int-quantized"
PACK_QUANTIZED = "pack-quantized"
SUPPORTED_FORMATS = (INT_QUANTIZED, PACK_QUANTIZED)


def is_marked(hf_quant_cfg: dict[str, Any] | None) -> bool:
    """True for a checkpoint written by our recipes (they add a ``ptq_ascend`` block)."""
    return isinstance(hf_quant_cfg, dict) and isinstance(hf_quant_cfg.get(QUANT_METHOD), dict)


@dataclass(frozen=True)
class SchemePlan:
    """What one config group asks for, checked to be servable; builds per-layer schemes."""

    group: str
    scheme: type[PtqScheme]
    options: tuple[tuple[str, Any], ...]

    def build(self, layer_name: str, files: dict[str, str], shards: list[str]) -> PtqScheme:
        return self.scheme(layer_name, files=files, shards=shards, **dict(self.options))


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
) -> SchemePlan | None:
    """Map one config group to a scheme, or raise naming the group and what is unsupported."""
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
            return SchemePlan(name, W4A4IntScheme, (("packed", fmt == PACK_QUANTIZED),))
        w4a8 = (
            weights.num_bits == 4
            and weights.symmetric
            and strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
            and not has_g_idx
            and int8_acts
            and dynamic_token
        )
        if w4a8:
            return SchemePlan(
                name,
                W4A8IntScheme,
                (
                    ("group_size", weights.group_size if strategy == QuantizationStrategy.GROUP else None),
                    ("packed", fmt == PACK_QUANTIZED),
                ),
            )
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
        return SchemePlan(
            name,
            W8A8Int8Scheme,
            (
                ("weight_per_channel", strategy == QuantizationStrategy.CHANNEL),
                ("static_input", not acts.dynamic),
                ("input_symmetric", bool(acts.symmetric)),
            ),
        )
    if fmt != PACK_QUANTIZED or strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL):
        raise CheckpointError(
            f"{where}: weight-only {_args(weights)} in format {fmt!r} is not supported; "
            "weight-only layers must be pack-quantized with group or channel scales"
        )
    if weights.num_bits not in (4, 8):
        raise CheckpointError(f"{where}: {weights.num_bits}-bit weights; supported: 4, 8")
    return SchemePlan(
        name,
        WNA16Scheme,
        (
            ("num_bits", weights.num_bits),
            ("group_size", weights.group_size if strategy == QuantizationStrategy.GROUP else None),
            ("symmetric", bool(weights.symmetric)),
            ("act_order", has_g_idx),  # actorder "weight"/"static" store no g_idx
        ),
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
) -> dict[str, SchemePlan | None]:
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


def _servable_by_us(hf_quant_cfg: dict[str, Any]) -> bool:
    try:
        ct, _, g_idx_groups = parse_ct_config(hf_quant_cfg)
        plan_groups(ct, g_idx_groups)
        parse_transform_config(hf_quant_cfg.get("transform_config"))
    except CheckpointError:
        return False
    return True


def _args(a: QuantizationArgs) -> str:
    return a.model_dump_json(include={"num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"})


class PtqAscendConfig(QuantizationConfig):
    """vLLM quantization config for the ``ptq_ascend`` method."""

    def __init__(
        self,
        ct_config: CTQuantizationConfig | None,
        plans: dict[str, SchemePlan | None],
        raw: dict[str, Any],
        modelslim: ModelSlimDescription | None = None,
    ):
        super().__init__()
        self.ct_config = ct_config
        self.raw = raw
        self.plans = plans
        # msModelSlim checkpoint: per-layer labels instead of config groups
        self.modelslim = modelslim
        # target -> group name, in config order (first matching target wins, as in vLLM)
        self.target_group: dict[str, str] = {}
        for name, group in (ct_config.config_groups if ct_config else {}).items():
            for target in group.targets:
                self.target_group.setdefault(target, name)
        self.ignore = list((ct_config.ignore if ct_config else None) or [])
        self.files: dict[str, str] = {}
        # online transforms: FlatQuant's, and Hadamard rotations (compressed-tensors' config ignores them)
        self.transforms: CheckpointTransforms = parse_transform_config((raw or {}).get("transform_config"))
        self.rotation_cache: dict = {}  # one normalised matrix per shared rotation tensor (online_transforms)

    # -- vLLM's QuantizationConfig API ---------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        # vLLM reads this file when config.json has no quantization_config (msModelSlim
        # checkpoints) and passes its dict to from_config.
        return [DESCRIPTION_FILE]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PtqAscendConfig":
        if not isinstance(config, dict):
            raise CheckpointError(
                f"config.json: quantization_config must be a JSON object, found {type(config).__name__}"
            )
        if is_description(config):
            return cls(None, {}, config, ModelSlimDescription(config))
        ct, config, g_idx_groups = parse_ct_config(config)
        return cls(ct, plan_groups(ct, g_idx_groups), config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        method = (hf_quant_cfg or {}).get("quant_method")
        if user_quant == QUANT_METHOD and method in (CT_METHOD, QUANT_METHOD):
            return QUANT_METHOD
        if user_quant is None and is_marked(hf_quant_cfg):
            return QUANT_METHOD
        if user_quant is None and method == CT_METHOD and _servable_by_us(hf_quant_cfg):
            # On Ascend, a checkpoint vLLM-Ascend's compressed-tensors config refuses (W8A16,
            # asymmetric static W8A8, ...) is served by ptq_ascend with no flag.
            from vllm_ptq_ascend.ascend_ct import vllm_ascend_cannot_serve

            why = vllm_ascend_cannot_serve(hf_quant_cfg)
            if why:
                logger.info(
                    "vllm-ptq-ascend: serving this compressed-tensors checkpoint with %s: %s",
                    QUANT_METHOD,
                    why,
                )
                return QUANT_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        # Index tensor -> file so load errors can name the file at fault.
        self.files = tensor_file_index(model_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        scheme = self.scheme_for(prefix, layer)
        from vllm_ptq_ascend.linear_method import PtqLinearMethod

        if scheme is not None:
            layer.scheme = scheme
        method = PtqLinearMethod(self) if scheme is not None else UnquantizedLinearMethod()
        if self.transforms.rotations is None:
            return method
        from vllm_ptq_ascend.online_transforms import with_online_rotations

        mapping = getattr(self, "packed_modules_mapping", None) or {}
        rotations = self.transforms.rotations
        return with_online_rotations(method, rotations, layer, prefix, mapping, self.rotation_cache)

    # -- layer -> scheme ------------------------------------------------------
    def shard_names(self, prefix: str) -> list[str]:
        """Checkpoint names behind a (possibly fused) vLLM layer: qkv_proj -> q/k/v_proj."""
        mapping = getattr(self, "packed_modules_mapping", None) or {}
        for fused, shards in mapping.items():
            if prefix.endswith(fused) and prefix.split(".")[-1] == fused:
                base = prefix[: -len(fused)]
                return [base + s for s in shards]
        return [prefix]

    def group_for(self, prefix: str, layer: torch.nn.Module) -> str | None:
        """The config group serving ``prefix``; fused shards must land in the same one."""
        per_shard = {}
        for shard in self.shard_names(prefix):
            if should_ignore_layer(shard, ignore=self.ignore):
                per_shard[shard] = None
                continue
            target = find_matched_target(shard, layer, self.target_group.keys())
            per_shard[shard] = self.target_group.get(target) if target else None
        groups = set(per_shard.values())
        if len(groups) > 1:
            detail = ", ".join(f"{s} -> {g or 'unquantized'}" for s, g in per_shard.items())
            raise CheckpointError(
                f"config.json: fused layer '{prefix}' mixes schemes across its shards ({detail}); "
                "vLLM runs a fused layer with one scheme"
            )
        return groups.pop()

    def scheme_for(self, prefix: str, layer: torch.nn.Module) -> PtqScheme | None:
        if self.modelslim is not None:
            return self.modelslim.scheme_for(prefix, self.shard_names(prefix), self.files)
        group = self.group_for(prefix, layer)
        plan = self.plans.get(group) if group else None
        shards = self.shard_names(prefix)
        flatquant = self.transforms.flatquant
        transform = transform_group_for(flatquant, shards, layer, prefix) if flatquant else None
        if transform is not None:
            return flatquant_scheme(plan, transform, prefix, self.files, shards)
        return plan.build(prefix, self.files, shards) if plan else None


def flatquant_scheme(
    plan: SchemePlan | None, transform: str, prefix: str, files: dict[str, str], shards: list[str]
) -> FlatQuantScheme:
    """The FlatQuant scheme for a layer with an input transform: its group must quantize
    activations per token at run time and weights per channel (the transform mixes channels)."""
    options = dict(plan.options) if plan else {}
    bits = None
    if plan is not None and plan.scheme is W4A4IntScheme:
        bits = (4, 4)
    elif plan is not None and plan.scheme is W4A8IntScheme and options.get("group_size") is None:
        bits = (4, 8)
    elif (
        plan is not None
        and plan.scheme is W8A8Int8Scheme
        and options["weight_per_channel"]
        and not options["static_input"]
    ):
        bits = (8, 8)
    if bits is None:
        what = f"config group {plan.group!r}" if plan else "no quantization config group (unquantized)"
        raise CheckpointError(
            f"config.json: layer '{prefix}' has a FlatQuant input transform ({transform!r}) but {what}; "
            "a transformed layer needs symmetric per-channel int4/int8 weights and int4/int8 per-token "
            "dynamic activations (W4A4, W4A8, W8A8)"
        )
    return FlatQuantScheme(
        prefix,
        weight_bits=bits[0],
        act_bits=bits[1],
        packed=bool(options.get("packed", False)),
        transform_group=transform,
        files=files,
        shards=shards,
    )
