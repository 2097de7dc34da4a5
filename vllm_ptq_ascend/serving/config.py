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
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationConfig as CTQuantizationConfig
from vllm.model_executor.layers.attention import Attention
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
from vllm_ptq_ascend.formats.compressed_tensors import (
    CT_METHOD,
    flatquant_plan,
    is_marked,
    parse_ct_config,
    plan_groups,
    servable_by_us,
)
from vllm_ptq_ascend.formats.kv_cache import KvCachePlan, checkpoint_block, plan_kv_cache
from vllm_ptq_ascend.formats.msmodelslim import DESCRIPTION_FILE, ModelSlimDescription, is_description
from vllm_ptq_ascend.formats.plan import LayerPlan
from vllm_ptq_ascend.formats.transforms import (
    CheckpointTransforms,
    parse_transform_config,
    transform_plan_for,
)
from vllm_ptq_ascend.schemes import PtqScheme
from vllm_ptq_ascend.schemes.registry import build_scheme
from vllm_ptq_ascend.validation import CheckpointError, agreed_by_shards, tensor_file_index

logger = logging.getLogger(__name__)


def _require_kv_platform(plan: KvCachePlan, modelslim: bool = False) -> None:
    """fp8 caches on CPU and CUDA (vLLM's), int8 on Ascend (vLLM-Ascend's C8); nothing falls back to bf16."""
    from vllm_ptq_ascend.kernels import current_platform_name

    on_npu = current_platform_name() == "npu"
    if plan.kind == "fp8" and on_npu:
        raise CheckpointError(
            "config.json: quantization_config.kv_cache_scheme: an fp8 KV cache is not served on Ascend "
            "(Atlas A2/A3 NPUs have no fp8; vLLM-Ascend's cache is int8, C8); quantize with --kv-cache int8 "
            "for Ascend, or serve this checkpoint on CPU or CUDA"
        )
    if plan.kind == "int8" and not on_npu:
        if modelslim:
            raise CheckpointError(
                f"{DESCRIPTION_FILE}: 'kv_cache_type' is 'C8' (an int8 KV cache), which is served on Ascend "
                "only (vLLM-Ascend's C8 attention); vLLM's CPU and CUDA attention have no int8 cache"
            )
        raise CheckpointError(
            "config.json: quantization_config.kv_cache_scheme: an int8 KV cache is served on Ascend only "
            "(vLLM-Ascend's C8 attention); vLLM's CPU and CUDA attention store fp8 caches: quantize with "
            "--kv-cache fp8 for them"
        )


class PtqAscendConfig(QuantizationConfig):
    """vLLM quantization config for the ``ptq_ascend`` method."""

    def __init__(
        self,
        ct_config: CTQuantizationConfig | None,
        plans: dict[str, LayerPlan | None],
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
        # vLLM's Attention reads ``kv_cache_scheme`` (a dict, as on its compressed-tensors config): when
        # set, an ``auto`` cache becomes fp8 and the layers load k_scale / v_scale through our method.
        # An int8 cache is vLLM-Ascend's C8: its attention reads ``enable_c8_quant`` instead.
        kv_scheme = (raw or {}).get("kv_cache_scheme") if ct_config else None
        self.kv_cache: KvCachePlan | None = plan_kv_cache(kv_scheme)
        fp8 = self.kv_cache is not None and self.kv_cache.kind == "fp8"
        self.kv_cache_scheme: dict | None = dict(kv_scheme) if fp8 else None
        # msModelSlim's C8: a scale and an offset per channel, in the blocks that have them
        self.c8_blocks: set[str] | None = None
        if modelslim is not None and modelslim.kv_cache is not None:
            self.kv_cache, self.c8_blocks = KvCachePlan("int8", "channel"), modelslim.c8_blocks()
        self.enable_c8_quant = self.kv_cache is not None and self.kv_cache.kind == "int8"

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
            served = cls(None, {}, config, ModelSlimDescription(config))
        else:
            ct, config, g_idx_groups = parse_ct_config(config)
            served = cls(ct, plan_groups(ct, g_idx_groups), config)
        if served.kv_cache is not None:  # here, not in __init__: `inspect` checks any platform's cache
            _require_kv_platform(served.kv_cache, modelslim=served.modelslim is not None)
        return served

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        method = (hf_quant_cfg or {}).get("quant_method")
        if user_quant == QUANT_METHOD and method in (CT_METHOD, QUANT_METHOD):
            return QUANT_METHOD
        if user_quant is None and is_marked(hf_quant_cfg):
            return QUANT_METHOD
        if user_quant is None and method == CT_METHOD and servable_by_us(hf_quant_cfg):
            # On Ascend, a checkpoint vLLM-Ascend's compressed-tensors config refuses (W8A16,
            # asymmetric static W8A8, ...) is served by ptq_ascend with no flag.
            from vllm_ptq_ascend.integrations.vllm_ascend_probe import vllm_ascend_cannot_serve

            why = vllm_ascend_cannot_serve(hf_quant_cfg)
            if why:
                logger.info(
                    "vllm-ptq-ascend: serving this compressed-tensors checkpoint with %s: %s",
                    QUANT_METHOD,
                    why,
                )
                return QUANT_METHOD
        return None

    def get_cache_scale_mapper(self):
        """vLLM's checkpoint -> layer names of KV scales; an int8 cache's go to vLLM-Ascend's C8
        parameters (``k_cache_scale``), ahead of vLLM's own rules."""
        mapper = super().get_cache_scale_mapper()
        if not self.enable_c8_quant:
            return mapper
        from vllm_ptq_ascend.integrations.vllm_ascend_kv import cache_scale_mapper

        return cache_scale_mapper(self._c8_tensors()) | mapper

    def _c8_tensors(self) -> dict[str, str]:
        """The checkpoint's C8 tensors -> vLLM-Ascend's C8 parameters, for this checkpoint's format."""
        from vllm_ptq_ascend.integrations import vllm_ascend_kv as kv

        return kv.CT_TENSORS if self.c8_blocks is None else kv.MODELSLIM_TENSORS

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        # Index tensor -> file so load errors can name the file at fault.
        self.files = tensor_file_index(model_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if self.kv_cache is not None and isinstance(layer, Attention):
            if self.enable_c8_quant:
                from vllm_ptq_ascend.integrations.vllm_ascend_kv import c8_kv_cache_method

                if self.c8_blocks is not None and checkpoint_block(prefix) not in self.c8_blocks:
                    return None  # msModelSlim: this block's cache stays unquantized (its is_c8_quant_layer)
                return c8_kv_cache_method(self, self.kv_cache, prefix, self._c8_tensors())
            from vllm_ptq_ascend.serving.kv_cache_method import PtqKVCacheMethod

            return PtqKVCacheMethod(self, prefix)
        if not isinstance(layer, LinearBase):
            return None
        scheme = self.scheme_for(prefix, layer)
        from vllm_ptq_ascend.serving.linear_method import PtqLinearMethod

        if scheme is not None:
            layer.scheme = scheme
        method = PtqLinearMethod(self) if scheme is not None else UnquantizedLinearMethod()
        if self.transforms.rotations is None:
            return method
        from vllm_ptq_ascend.serving.online_transforms import with_online_rotations

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
        problem = f"config.json: fused layer '{prefix}' mixes schemes across its shards"
        why = "vLLM runs a fused layer with one scheme"
        return agreed_by_shards(per_shard, problem, why, unset="unquantized")

    def plan_for(self, prefix: str, layer: torch.nn.Module) -> LayerPlan | None:
        """The layer's plan (None: unquantized), from its format."""
        shards = self.shard_names(prefix)
        if self.modelslim is not None:
            return self.modelslim.plan_for(prefix, shards)
        group = self.group_for(prefix, layer)
        plan = self.plans.get(group) if group else None
        flatquant = self.transforms.flatquant
        transform = transform_plan_for(flatquant, shards, layer, prefix) if flatquant else None
        if transform is None:
            return plan
        return flatquant_plan(plan, transform.group, prefix, transform.head_dim)

    def scheme_for(self, prefix: str, layer: torch.nn.Module) -> PtqScheme | None:
        plan = self.plan_for(prefix, layer)
        return None if plan is None else build_scheme(plan, prefix, self.files, self.shard_names(prefix))
