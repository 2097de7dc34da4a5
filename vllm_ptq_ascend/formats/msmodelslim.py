"""msModelSlim checkpoints: ``quant_model_description.json`` -> a plan per linear layer.

The upstream sources it follows and the layouts in detail: ``docs/sources.md``.
"""

from __future__ import annotations

from typing import Any

from vllm_ptq_ascend.formats.plan import MODELSLIM_FORMAT, LayerPlan
from vllm_ptq_ascend.validation import CheckpointError, agreed_by_shards

DESCRIPTION_FILE = "quant_model_description.json"
WHERE = DESCRIPTION_FILE
FLATQUANT = ("W4A4_FLATQUANT_DYNAMIC", "W8A8_FLATQUANT_DYNAMIC", "W4A8_FLATQUANT_DYNAMIC")
SERVED = ("FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "W4A8_DYNAMIC", *FLATQUANT)
# Linear-layer labels msModelSlim 26.1.0 writes itself: AscendV1Saver.on_* and its
# QUANT_TYPE_PRIORITY (modelslim_v1/save/ascendv1.py), the legacy QuantType enum
# (llm_ptq_tools/llm_ptq_utils.py) and the sparse compression tool (weight_compression/compress_tools.py).
BASE_LABELS = (
    "FLOAT",
    "W8A8",
    "W8A8_DYNAMIC",
    "W8A8_MIX",
    "W8A16",
    "W4A16",
    "W4A8_DYNAMIC",
    "W4A4_DYNAMIC",
    "W16A16S",
    "W16A16SC",
    "W8A8S",
    "W8A8SC",
    "W8A8_TIMESTEP",
    "NF4",
    "WFP8AFP8_DYNAMIC",
    "W8A8_MXFP8",
    "W4A8_MXFP",
    "W4A4_MXFP4",
    "W4A4_MXFP4_DUALSCALE",
    "UNKNOWN",
    # named by other msModelSlim versions (the snapshot msmodelslim_w4a8.py cites), not written by 26.1.0
    "W4A16_MXFP4",
    "W8A8FP8_DYNAMIC",
)


def flatquant_label(label: str) -> str:
    """The label of a layer wrapped by FlatQuant (AscendV1Saver.on_flat_clip_wrapper)."""
    if label.endswith("_DYNAMIC"):
        return label.replace("_DYNAMIC", "_FLATQUANT_DYNAMIC")
    return label + "_FLATQUANT"


def svd_label(label: str) -> str:
    """The label of a layer wrapped by the SVD residual (AscendV1Saver.on_svd_wrapper; FLOAT stays)."""
    if label == "FLOAT":
        return label
    return label.replace("_DYNAMIC", "_SVD_DYNAMIC") if label.endswith("_DYNAMIC") else label + "_SVD"


def _derived_labels() -> tuple[str, ...]:
    """Every label the wrappers can make of a base label (either wrapper over the other, too)."""
    out: dict[str, None] = {}
    for base in BASE_LABELS:
        for label in (
            base,
            flatquant_label(base),
            svd_label(base),
            flatquant_label(svd_label(base)),
            svd_label(flatquant_label(base)),
        ):
            out.setdefault(label, None)
    return tuple(out)


KNOWN_UNSERVED = tuple(label for label in _derived_labels() if label not in SERVED)
NOT_YET = KNOWN_UNSERVED  # (the name older code and tests use)
# labels of non-linear tensors (KV cache, attention, norms) that may appear in a description
OTHER = ("C8", "FAQuant", "FAKQuant", "INT8_DYNAMIC")
# every non-tensor key msModelSlim 26.1.0 writes (docs/sources.md); those in SERVED_KEYS are read,
# the others must be absent (or null)
SERVED_KEYS = ("model_quant_type", "version", "group_size", "metadata", "optional")
# KV-cache quantization: C8 (int8, a scale and offset per channel) is served on Ascend; others are not
KV_KEYS = ("kv_cache_type", "kv_quant_type")
C8 = "C8"
# the C8 tensors of an attention block, as msModelSlim's AscendV1Saver.on_dynamic_cache writes them
C8_TENSORS = (
    "k_proj.kv_cache_scale",
    "k_proj.kv_cache_offset",
    "v_proj.kv_cache_scale",
    "v_proj.kv_cache_offset",
)
UNSERVED_KEYS = {
    "fa_quant_type": "attention (FlashAttention) quantization",
    "reduce_quant_type": "communication (all-reduce) quantization of simulated tensor parallelism",
    "indexer_quant_type": "lightning-indexer quantization (DeepSeek-V3.2 / GLM-5)",
    "is_rot_used": "online rotation (GLM-5)",
}
DESCRIPTION_KEYS = (*SERVED_KEYS, *KV_KEYS, *UNSERVED_KEYS)
META_KEYS = DESCRIPTION_KEYS  # (the name inspect_checkpoint.py used)
FA3_SUFFIX = ".quant_type"  # <attention block>.quant_type: FA3 activation quantization (update_fa_quant_type)


def unserved_reason(label: str) -> str:
    """Why a known label is not served (for the error message)."""
    if "SVD" in label:
        return "an SVD low-rank residual beside the quantized weight (SVDResidualWrapper)"
    if "MXFP" in label:
        return "MX floating-point formats"
    if "FLATQUANT" in label:
        return "FlatQuant is served for W4A4/W8A8/W4A8 with per-token dynamic activations only"
    if label in ("W8A8S", "W8A8SC", "W16A16S", "W16A16SC"):
        return "sparse (and compressed) weights"
    if label == "WFP8AFP8_DYNAMIC":
        return "FP8 weights and activations"
    if label == "W8A8_MIX":
        return "per-tensor / per-token mixed W8A8 (prefill/decode)"
    if label == "W4A4_DYNAMIC":
        return "int4 weights with int4 per-token activations (msModelSlim layout)"
    return "not implemented"


def is_description(config: dict[str, Any]) -> bool:
    """True for a ``quant_model_description.json`` dict (not a compressed-tensors config)."""
    if not isinstance(config, dict) or "quant_method" in config or "config_groups" in config:
        return False
    return "model_quant_type" in config or any(
        isinstance(k, str) and k.endswith(".weight") and isinstance(v, str) for k, v in config.items()
    )


class ModelSlimDescription:
    """The parsed description: labels per tensor, checked once at start-up.

    Everything in it that ptq_ascend does not serve and that belongs to no linear layer (KV-cache,
    attention or communication quantization, online rotations) is collected in ``problems``, each
    message naming the file, the key (layer, tensor) and the value; with ``strict`` (serving) they
    are raised at once, ``inspect`` reports them one by one. Unserved linear-layer labels are refused
    per layer by :meth:`label_for`.
    """

    def __init__(self, config: dict[str, Any], strict: bool = True):
        self.raw = config
        self.problems: list[str] = []
        version = config.get("version")
        version = "0" if version is None else version  # the legacy saver writes none
        if not isinstance(version, str):
            raise CheckpointError(f"{WHERE}: 'version' must be a string such as \"1.0.0\", found {version!r}")
        self.version = version
        gs = config.get("group_size", 0)
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 0:
            raise CheckpointError(f"{WHERE}: 'group_size' must be an integer >= 0, found {gs!r}")
        self.group_size = gs
        mqt = config.get("model_quant_type")
        if mqt is not None and not isinstance(mqt, str):
            raise CheckpointError(f"{WHERE}: 'model_quant_type' must be a string, found {mqt!r}")
        self._check_meta(config)
        self.labels: dict[str, str] = {}
        for key, label in config.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{WHERE}: keys must be tensor names (strings), found {key!r}")
            if key in DESCRIPTION_KEYS:
                continue
            if key.endswith(FA3_SUFFIX):  # <attention block>.quant_type (FA3), no tensor of its own
                self.problems.append(
                    f"{WHERE}: layer '{key.removesuffix(FA3_SUFFIX)}' has attention (FA3) activation "
                    f"quantization ('{key}': {label!r}), which ptq_ascend does not serve"
                )
                continue
            if label == C8 and self.kv_cache == C8 and key.endswith(C8_TENSORS):
                self.c8_tensors.add(key)
                continue
            if label in OTHER:  # KV-cache (C8) and attention (FAQuant) tensors
                layer = key.rsplit(".", 1)[0]
                what = "KV-cache quantization" if label == "C8" else "attention (FlashAttention) quantization"
                self.problems.append(
                    f"{WHERE}: tensor '{key}' (layer '{layer}') has label {label!r} ({what}), which "
                    "ptq_ascend does not serve"
                )
                continue
            if not key.endswith(".weight"):
                continue
            if not isinstance(label, str) or label not in (*SERVED, *KNOWN_UNSERVED):
                raise CheckpointError(
                    f"{WHERE}: tensor '{key}' (layer '{key.removesuffix('.weight')}') has unknown "
                    f"label {label!r}; served labels: {', '.join(SERVED)}"
                )
            self.labels[key] = label
        self._check_c8_tensors()
        if strict and self.problems:
            raise CheckpointError("; ".join(self.problems))

    def _check_c8_tensors(self) -> None:
        """A C8 description has, in each C8 block, the four tensors vLLM-Ascend's C8 method loads."""
        if self.kv_cache != C8:
            return
        blocks = self.c8_blocks()
        if not blocks:
            self.problems.append(
                f"{WHERE}: 'kv_cache_type' is 'C8', but no tensor '<block>.k_proj.kv_cache_scale' is "
                "labelled C8 (msModelSlim writes a scale and an offset per channel for keys and values)"
            )
        for block in sorted(blocks):
            missing = [f"{block}.{t}" for t in C8_TENSORS if f"{block}.{t}" not in self.c8_tensors]
            if missing:
                self.problems.append(
                    f"{WHERE}: 'kv_cache_type' is 'C8', but attention block '{block}' lacks "
                    f"{', '.join(repr(m) for m in missing)} (labelled C8)"
                )

    def _check_kv_cache(self, config: dict[str, Any]) -> None:
        """``kv_cache_type`` / ``kv_quant_type``: absent, or C8 (what vLLM-Ascend's C8 method serves)."""
        self.kv_cache: str | None = None
        self.c8_tensors: set[str] = set()
        values = {k: config.get(k) for k in KV_KEYS if config.get(k) not in (None, False)}
        if not values:
            return
        if all(v == C8 for v in values.values()):
            self.kv_cache = C8
            return
        self.problems.append(
            f"{WHERE}: KV-cache quantization {values} is not served; ptq_ascend serves C8 (int8, on Ascend)"
        )

    def c8_blocks(self) -> set[str]:
        """The attention blocks whose KV cache is C8 ('model.layers.0.self_attn'), as vLLM-Ascend decides
        them: the blocks with a ``k_proj.kv_cache_scale``."""
        return {
            key.removesuffix(".k_proj.kv_cache_scale")
            for key in self.c8_tensors
            if ".k_proj.kv_cache_scale" in key
        }

    def _check_meta(self, config: dict[str, Any]) -> None:
        self._check_kv_cache(config)
        for key, what in UNSERVED_KEYS.items():
            value = config.get(key)
            if value is not None and value is not False:
                self.problems.append(
                    f"{WHERE}: '{key}' is {value!r} ({what}), which ptq_ascend does not serve"
                )
        for key in ("metadata", "optional"):
            if key in config and not isinstance(config[key], dict):
                raise CheckpointError(f"{WHERE}: '{key}' must be a JSON object, found {config[key]!r}")
        # metadata: {} or {"quarot": {"heads_rotation": {"layers": [...]}, "kronecker_rotation": ...}},
        # rotations applied ONLINE (AscendV1Saver.post_run, ir/quarot.py get_quarot_save_info)
        for key, value in (config.get("metadata") or {}).items():
            if key == "quarot" and isinstance(value, dict):
                layers = [
                    name
                    for part in ("heads_rotation", "kronecker_rotation")
                    for name in ((value.get(part) or {}).get("layers") or [])
                    if isinstance(value.get(part), dict)
                ]
                where_layers = f" on layers {', '.join(map(str, layers))}" if layers else ""
                self.problems.append(
                    f"{WHERE}: 'metadata.quarot' describes online QuaRot rotations{where_layers} "
                    "(tensors '*.heads_rotation', '*.kronecker_rotation_m/n'), which ptq_ascend does not "
                    "serve: the rotated weights would run without their online rotation"
                )
            else:
                self.problems.append(
                    f"{WHERE}: 'metadata.{key}' ({value!r}) is not something ptq_ascend knows how to serve"
                )
        # optional: export-only extras (an offline global rotation already folded into the weights)

    def label_for(self, prefix: str, shards: list[str]) -> str:
        """The label of a (possibly fused) layer; every shard must have one, the same."""
        per_shard = {}
        for shard in shards:
            nonfusion = self._nonfusion_layout(shard)
            if nonfusion:
                raise CheckpointError(
                    f"{WHERE}: layer '{prefix}' is in msModelSlim's NonFusionSmoothQuant layout "
                    f"({nonfusion}), which ptq_ascend does not serve (the smoothing scale would have to "
                    "divide the input online)"
                )
            label = self.labels.get(f"{shard}.weight")
            if label is None:
                raise CheckpointError(
                    f"{WHERE}: no label for '{shard}.weight' (layer '{prefix}'); every linear "
                    "layer needs one (FLOAT for an unquantized layer)"
                )
            per_shard[shard] = label
        problem = f"{WHERE}: fused layer '{prefix}' has shards with different labels"
        label = agreed_by_shards(per_shard, problem, "vLLM runs a fused layer with one scheme")
        if label not in SERVED:
            raise CheckpointError(
                f"{WHERE}: layer '{prefix}' has label {label!r}, which ptq_ascend does not serve yet "
                f"({unserved_reason(label)}; served: {', '.join(SERVED)})"
            )
        return label

    def _nonfusion_layout(self, shard: str) -> str:
        """'<x>.div.mul_scale' + '<x>.linear.weight' (AscendV1Saver.on_non_fusion_smooth_quant_wrapper),
        seen from vLLM's layer '<x>' or from the tensor prefix '<x>.linear'; '' if not."""
        base = shard.removesuffix(".linear")
        scale, weight = f"{base}.div.mul_scale", f"{base}.linear.weight"
        if scale in self.raw and weight in self.raw and (shard == base or shard.endswith(".linear")):
            return f"'{scale}' and '{weight}' labelled {self.raw[weight]!r}"
        return ""

    def plan_for(self, prefix: str, shards: list[str]) -> LayerPlan | None:
        """The layer's plan: its label and what the description says of its layout (None: FLOAT)."""
        label = self.label_for(prefix, shards)
        if label == "FLOAT":
            return None
        options: dict[str, Any] = {}
        if label in ("W4A4_FLATQUANT_DYNAMIC", "W8A8_FLATQUANT_DYNAMIC"):
            options = {"label": label}
        elif label == "W4A8_FLATQUANT_DYNAMIC":
            options = {"version": self.version}
        elif label == "W4A8_DYNAMIC":
            options = {"group_size": w4a8_group_size(self.raw, self.version), "version": self.version}
        elif label in ("W8A16", "W4A16"):
            bits = 8 if label == "W8A16" else 4
            options = {
                "num_bits": bits,
                "group_size": self.group_size,
                "packed": bits == 4 and self.version == PACKED_VERSION,
            }
        return LayerPlan(MODELSLIM_FORMAT, label, tuple(options.items()), source=label)


# W4A8_DYNAMIC layouts: "0" is vLLM-Ascend's default when the description has no version
LEGACY_VERSIONS = ("0",)
# msModelSlim's ascendV1 layout: int4 pairs packed into int8 along the output dim, scale_bias
PACKED_VERSION = "1.0.0"
LEGACY_DEFAULT_GROUP = 256  # vLLM-Ascend's default without "group_size" (the legacy saver writes none)


def w4a8_group_size(description: dict, version: str) -> int:
    """The description's ``group_size``; without one, vLLM-Ascend's 256 for the legacy layout."""
    if "group_size" not in description and version in LEGACY_VERSIONS:
        return LEGACY_DEFAULT_GROUP
    return int(description.get("group_size", 0))


__all__ = ["DESCRIPTION_FILE", "ModelSlimDescription", "is_description"]
