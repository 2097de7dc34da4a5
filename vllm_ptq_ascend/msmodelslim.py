"""msModelSlim checkpoints (``quant_model_description.json``) served by ``ptq_ascend``.

msModelSlim (github Ascend/msmodelslim) writes, next to ``config.json`` (whose
``quantization_config`` it removes), a description ``{"model_quant_type": "W8A8",
"version": "1.0.0", "group_size": 0, "<tensor name>": "<LABEL>", ...}`` and
``quant_model_weights*.safetensors``. A linear layer's label is the one of
``<prefix>.weight``; the fused shards of a vLLM layer (q/k/v, gate/up) must agree,
as vllm-ascend requires (vllm-project/vllm-ascend
``vllm_ascend/quantization/modelslim_config.py``: ``get_linear_quant_type``,
``is_layer_skipped_ascend``).

Each label is mapped onto an EXISTING scheme (schemes/): the layer registers the
msModelSlim tensors under their checkpoint names (vLLM looks parameters up by those
names) through the checked loaders, and once loaded they are translated into what
the scheme holds for a compressed-tensors checkpoint, then the scheme validates and
prepares them for the kernel backend as usual.

Tensors per label, as msModelSlim writes them (Ascend/msmodelslim
``msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py`` ``on_*`` and
``msmodelslim/pytorch/llm_ptq/llm_ptq_tools/save/complex_quantifier.py``
``generate_weight_of_linear_module``) and as vllm-ascend creates them
(``vllm_ascend/quantization/methods/w8a8_static.py``, ``w8a8_dynamic.py``,
``w8a16.py``):

- W8A8 (static): ``weight`` int8 [out, in]; ``input_scale`` [1] and ``input_offset``
  [1] (float32); ``deq_scale`` [out] (float32, or for float16 models its float32 bit
  pattern stored in int64, ``deqscale2int64``); ``quant_bias`` int32 [out] =
  round(bias / deq_scale - rowsum(weight) * input_offset); optionally (older saver)
  ``weight_scale`` / ``weight_offset`` [out, 1]. -> W8A8Int8Scheme, per-channel weights,
  static per-tensor activations, zero point = ``input_offset`` (msModelSlim quantizes
  q = round(x / s + offset), dequantizes (q - offset) * s:
  ``msmodelslim/ir/api/impl/int_quantization.py``). ``deq_scale`` and ``quant_bias`` are
  what the NPU GEMM consumes (``npu_quant_matmul``); we recompute both from the
  primary tensors and refuse a checkpoint where they disagree. Without
  ``weight_scale``, it is ``deq_scale / input_scale``.
- W8A8_DYNAMIC: ``weight`` int8 [out, in], ``weight_scale`` [out, 1], ``weight_offset``
  [out, 1] (zeros: msModelSlim writes zeros, vllm-ascend ignores it) ->
  W8A8Int8Scheme, per-channel weights, per-token dynamic activations.
- W8A16 / W4A16: ``weight`` int8, ``weight_scale`` and ``weight_offset`` [out, groups]
  (float32; groups from the description's ``group_size``, 0 = per channel);
  dequantized as (q - weight_offset) * weight_scale
  (``.../fake_quantize/w8a16_w4a16_fakequantizer.py``), so zero point =
  ``weight_offset``. -> WNA16Scheme (packed into compressed-tensors' int32 layout).
  W4A16 ``weight`` is one int4 value per int8 [out, in], except for version "1.0.0"
  (ascendV1 saver, ``_w4a16_pack_int4``): two int4 per int8, low nibble = even
  index, packed along the output dim ([out/2, in]) with per-group scales and along the
  input dim ([out, in/2]) per channel.
  Note: vllm-ascend passes ``weight_offset`` unchanged as ``antiquant_offset`` of
  ``npu_weight_quant_batchmatmul``, documented as scale * (q + offset); the two agree
  only for symmetric (zero-offset) weights. We follow the producer's definition.
- W4A8_DYNAMIC (msmodelslim_w4a8.py, which records the sources read): int4 weights, two-level
  symmetric scales ``weight_scale`` [out, 1] x ``weight_scale_second`` [out, in / group]
  (per channel for the ascendV1 saver's group_size 0), int8 per-token dynamic activations;
  version "1.0.0" packs int4 pairs along the output dim and adds ``scale_bias`` (an NPU-kernel
  correction, 8 * sum of the dequantized weight per input slice: verified, not used); no
  version = the legacy unpacked layout (group 256 without ``group_size``). -> W4A8IntScheme
  with per-group scales ``weight_scale * weight_scale_second``; non-zero offsets and other
  versions are refused.
- W4A4_FLATQUANT_DYNAMIC, W8A8_FLATQUANT_DYNAMIC, W4A8_FLATQUANT_DYNAMIC
  (msmodelslim_flatquant.py, which records the sources read): the tensors of W8A8_DYNAMIC (int4
  values in int8 for W4A4) or of W4A8_DYNAMIC "1.0.0" per channel, plus ``left_trans``,
  ``right_trans`` (absent for o_proj) and ``clip_ratio`` -> FlatQuantScheme with L = left_trans,
  R = right_trans and each fused shard's own clip ratio.
- FLOAT: unquantized.

Not served (an error naming the layer and the label, at start-up and in ``inspect``): every other
label msModelSlim 26.1.0 writes (``KNOWN_UNSERVED``, built from its savers' label rules), KV-cache,
attention (FA3) and communication quantization, online QuaRot rotations (``metadata.quarot``) and
the NonFusionSmoothQuant layout (``<layer>.div.mul_scale`` + ``<layer>.linear.weight``).

Non-tensor keys of the description (``DESCRIPTION_KEYS``), as msModelSlim 26.1.0 writes them:
``AscendV1Saver.post_run`` (``msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py``) always
writes ``version`` ("1.0.0"), ``model_quant_type``, ``metadata`` (a dict: ``{}``, or
``{"quarot": {...}}`` for online rotations), ``group_size`` and ``optional`` (a dict of export-only
extras: ``{}``, or ``{"quarot": {"rotation_map": {"global_rotation": <file>}}}`` for an OFFLINE
rotation already folded into the weights); ``on_dynamic_cache`` adds ``kv_cache_type`` /
``kv_quant_type`` ("C8"), the FA3 savers ``fa_quant_type`` and per attention block
``<block>.quant_type`` (e.g. "INT8", "FP8_DYNAMIC"). The legacy saver's ``QuantModelJsonDescription``
(``msmodelslim/pytorch/llm_ptq/llm_ptq_tools/llm_ptq_utils.py``) writes ``model_quant_type``,
``version`` (ascendV1 only), ``group_size`` (only when > 0), ``kv_cache_type`` / ``kv_quant_type``
("C8"), ``fa_quant_type`` ("FAQuant") and ``reduce_quant_type`` ("per_channel", simulated-TP
communication quantization). Model adapters add ``indexer_quant_type`` (DeepSeek-V3.2, GLM-5) and
``is_rot_used`` (GLM-5). Served: ``model_quant_type`` (informative: the per-tensor labels decide),
``version``, ``group_size``, an empty ``metadata``, any ``optional``; the others are refused when set.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)

from vllm_ptq_ascend.formats.plan import MODELSLIM_FORMAT, LayerPlan
from vllm_ptq_ascend.schemes import PtqScheme, W8A8Int8Scheme, WNA16Scheme, int_weights
from vllm_ptq_ascend.validation import FLOAT_DTYPES, CheckpointError, TensorSpec, require_loaded

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
# every non-tensor key msModelSlim 26.1.0 writes (module docstring); those in SERVED_KEYS are read,
# the others must be absent (or null)
SERVED_KEYS = ("model_quant_type", "version", "group_size", "metadata", "optional")
UNSERVED_KEYS = {
    "kv_cache_type": "KV-cache quantization",
    "kv_quant_type": "KV-cache quantization",
    "fa_quant_type": "attention (FlashAttention) quantization",
    "reduce_quant_type": "communication (all-reduce) quantization of simulated tensor parallelism",
    "indexer_quant_type": "lightning-indexer quantization (DeepSeek-V3.2 / GLM-5)",
    "is_rot_used": "online rotation (GLM-5)",
}
DESCRIPTION_KEYS = (*SERVED_KEYS, *UNSERVED_KEYS)
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


# relative tolerance of deq_scale against input_scale * weight_scale: both are written in
# float32 from the same float32 scales (ascendv1.py), so they agree to a few ulp; 1e-2 also
# admits scales stored in bfloat16 by older tools and still catches any real disagreement.
DEQ_SCALE_RTOL = 1e-2


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
        if strict and self.problems:
            raise CheckpointError("; ".join(self.problems))

    def _check_meta(self, config: dict[str, Any]) -> None:
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
        if len(set(per_shard.values())) > 1:
            detail = ", ".join(f"{s} -> {lab}" for s, lab in per_shard.items())
            raise CheckpointError(
                f"{WHERE}: fused layer '{prefix}' has shards with different labels ({detail}); "
                "vLLM runs a fused layer with one scheme"
            )
        label = next(iter(per_shard.values()))
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
            from vllm_ptq_ascend.msmodelslim_w4a8 import w4a8_group_size

            options = {"group_size": w4a8_group_size(self.raw, self.version), "version": self.version}
        elif label in ("W8A16", "W4A16"):
            bits = 8 if label == "W8A16" else 4
            options = {
                "num_bits": bits,
                "group_size": self.group_size,
                "packed": bits == 4 and self.version == "1.0.0",
            }
        return LayerPlan(MODELSLIM_FORMAT, label, tuple(options.items()), source=label)


def set_param(layer: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """(Re)register ``name`` on ``layer`` as a frozen parameter (or None)."""
    if name in layer._parameters:
        del layer._parameters[name]
    elif hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(
        name, None if tensor is None else torch.nn.Parameter(tensor, requires_grad=False)
    )


def drop(layer: torch.nn.Module, *names: str) -> None:
    for name in names:
        if name in layer._parameters:
            del layer._parameters[name]


def loaded(layer: torch.nn.Module, name: str) -> bool:
    p = getattr(layer, name, None)
    return p is not None and bool(getattr(p, "ptq_loaded_shards", None))


def int64_bits_as_float32(inner: Callable) -> Callable:
    """deq_scale of float16 models is stored as its float32 bit pattern in int64
    (msmodelslim ``format/common/deqscale.py`` ``deqscale2int64``): reinterpret it."""

    def load(param, loaded_weight, *args, **kwargs):
        if loaded_weight.dtype == torch.int64:
            loaded_weight = loaded_weight.to(torch.int32).view(torch.float32)
        return inner(param, loaded_weight, *args, **kwargs)

    return load


class _ModelSlimScheme(PtqScheme):
    """Registers msModelSlim tensors, translates them after loading, then runs ``self.inner``."""

    label = ""
    inner: PtqScheme | None = None

    def describe(self) -> str:
        inner = f" -> {self.inner.describe()}" if self.inner is not None else ""
        return f"msModelSlim {self.label}{inner}"

    def process_weights_after_loading(self, layer):
        require_loaded(layer, self.layer_name, self.tensor_names, self.files, self.shards)
        self.inner = self.translate(layer)
        self.inner.validate_loaded(layer)
        self.inner.prepare(layer)

    def translate(self, layer) -> PtqScheme:
        raise NotImplementedError

    def prepare(self, layer):  # done by the inner scheme
        raise NotImplementedError

    def apply_weights(self, layer, x, bias=None):
        return self.inner.apply_weights(layer, x, bias)

    def _channel_param(self, layer, name, out_features, dtypes, weight_loader, dtype=torch.float32, cols=1):
        shape = (out_features, cols) if cols else (out_features,)
        layer.register_parameter(
            name,
            ChannelQuantScaleParameter(
                data=torch.zeros(shape, dtype=dtype),
                output_dim=0,
                weight_loader=self.loader(weight_loader, name, dtypes),
            ),
        )

    def _require_zero(self, layer, name):
        if loaded(layer, name):
            t = getattr(layer, name).data
            if bool((t != 0).any()):
                raise CheckpointError(
                    f"{self.where(name)}: {self.label} weights must be symmetric (all offsets 0), "
                    f"found {int((t != 0).sum())} non-zero (vllm-ascend ignores them too)"
                )


class ModelSlimW8A8Dynamic(_ModelSlimScheme):
    serves = ((MODELSLIM_FORMAT, "W8A8_DYNAMIC"),)

    label = "W8A8_DYNAMIC"
    tensor_names = ("weight", "weight_scale")

    def checkpoint_tensors(self, out_features, in_features):
        channel = ((out_features, 1),)
        return int_weights.int8_weight_spec(out_features, in_features) | {
            "weight_scale": TensorSpec(FLOAT_DTYPES, channel, scale=True),
            "weight_offset": TensorSpec(FLOAT_DTYPES, channel, required=False),
        }

    def create_weights(
        self,
        layer,
        input_size,
        input_size_per_partition,
        output_partition_sizes,
        output_size,
        params_dtype,
        weight_loader,
    ):
        out = int_weights.setup_layer(
            layer, input_size, input_size_per_partition, output_partition_sizes, output_size, params_dtype
        )
        int_weights.register_int8_weight(layer, self, out, input_size_per_partition, weight_loader)
        self._channel_param(layer, "weight_scale", out, FLOAT_DTYPES, weight_loader)
        self._channel_param(layer, "weight_offset", out, FLOAT_DTYPES, weight_loader)

    def translate(self, layer):
        self._require_zero(layer, "weight_offset")
        drop(layer, "weight_offset")
        set_param(layer, "input_scale", None)
        set_param(layer, "input_zero_point", None)
        set_param(layer, "azp_adj", None)
        return W8A8Int8Scheme(
            self.layer_name, weight_per_channel=True, static_input=False, files=self.files, shards=self.shards
        )


class ModelSlimW8A8(_ModelSlimScheme):
    serves = ((MODELSLIM_FORMAT, "W8A8"),)

    label = "W8A8"
    tensor_names = ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias")

    def checkpoint_tensors(self, out_features, in_features):
        channel, per_tensor = ((out_features, 1),), ((1,), ())
        return int_weights.int8_weight_spec(out_features, in_features) | {
            "input_scale": TensorSpec(FLOAT_DTYPES, per_tensor, scale=True),
            "input_offset": TensorSpec((*FLOAT_DTYPES, torch.int8, torch.int32), per_tensor),
            # int64: float32 bit patterns (int64_bits_as_float32)
            "deq_scale": TensorSpec((*FLOAT_DTYPES, torch.int64), ((out_features,),), scale=True),
            "quant_bias": TensorSpec((torch.int32,), ((out_features,),)),
            "weight_scale": TensorSpec(FLOAT_DTYPES, channel, required=False, scale=True),
            "weight_offset": TensorSpec(FLOAT_DTYPES, channel, required=False),
        }

    def create_weights(
        self,
        layer,
        input_size,
        input_size_per_partition,
        output_partition_sizes,
        output_size,
        params_dtype,
        weight_loader,
    ):
        out = int_weights.setup_layer(
            layer, input_size, input_size_per_partition, output_partition_sizes, output_size, params_dtype
        )
        n_shards = len(output_partition_sizes)
        int_weights.register_int8_weight(layer, self, out, input_size_per_partition, weight_loader)
        # optional: the ascendV1 saver writes no weight_scale/weight_offset for W8A8
        self._channel_param(layer, "weight_scale", out, FLOAT_DTYPES, weight_loader)
        self._channel_param(layer, "weight_offset", out, FLOAT_DTYPES, weight_loader)
        self._channel_param(layer, "quant_bias", out, (torch.int32,), weight_loader, torch.int64, cols=0)
        layer.register_parameter(
            "deq_scale",
            ChannelQuantScaleParameter(
                data=torch.zeros(out, dtype=torch.float32),
                output_dim=0,
                weight_loader=self.loader(
                    int64_bits_as_float32(weight_loader), "deq_scale", (*FLOAT_DTYPES, torch.int64)
                ),
            ),
        )
        for name, dtypes in (
            ("input_scale", FLOAT_DTYPES),
            ("input_offset", (*FLOAT_DTYPES, torch.int8, torch.int32)),
        ):
            layer.register_parameter(
                name,
                PerTensorScaleParameter(
                    data=torch.zeros(n_shards, dtype=torch.float32),
                    weight_loader=self.loader(weight_loader, name, dtypes),
                ),
            )

    def translate(self, layer):
        offset = layer.input_offset.data.double()
        if bool((offset != offset.round()).any() or (offset < -128).any() or (offset > 127).any()):
            raise CheckpointError(
                f"{self.where('input_offset')}: must hold integers in [-128, 127], found {offset.tolist()}"
            )
        self._require_zero(layer, "weight_offset")
        widths = torch.tensor(layer.logical_widths)
        in_scale = torch.repeat_interleave(layer.input_scale.data.double(), widths)  # per output row
        in_zp = torch.repeat_interleave(offset, widths)
        deq = layer.deq_scale.data.double()
        if loaded(layer, "weight_scale"):
            w_scale = layer.weight_scale.data.double().reshape(-1)
            expected = in_scale * w_scale
            bad = (deq - expected).abs() > DEQ_SCALE_RTOL * expected.abs()
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise CheckpointError(
                    f"{self.where('deq_scale')}: disagrees with input_scale * weight_scale in "
                    f"{int(bad.sum())} channel(s) (first: channel {i}, deq_scale {deq[i].item():.6g}, "
                    f"input_scale * weight_scale {expected[i].item():.6g})"
                )
        else:  # derived: the NPU runs on deq_scale alone
            w_scale = deq / in_scale
        # quant_bias = round(bias / deq_scale - rowsum(weight) * input_offset) (ascendv1.py
        # on_w8a8_static). Row-parallel ranks hold part of each row: checked without TP split only.
        if layer.input_size_per_partition == layer.full_weight_shape[1]:
            bias = getattr(layer, "bias", None)
            fp_bias = bias.data.double() if bias is not None else torch.zeros_like(deq)
            rowsum = layer.weight.data.double().sum(1)
            expected = torch.round(fp_bias / deq - rowsum * in_zp)
            bad = (layer.quant_bias.data.double() - expected).abs() > 1 + 1e-6 * expected.abs()
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise CheckpointError(
                    f"{self.where('quant_bias')}: disagrees with round(bias / deq_scale - "
                    f"rowsum(weight) * input_offset) in {int(bad.sum())} channel(s) (first: channel {i}, "
                    f"{int(layer.quant_bias.data[i])} vs {int(expected[i])})"
                )
        symmetric = bool((offset == 0).all())
        set_param(layer, "weight_scale", w_scale.float().reshape(-1, 1))
        set_param(layer, "input_zero_point", None if symmetric else offset.to(torch.int8))
        set_param(layer, "azp_adj", None)
        drop(layer, "weight_offset", "input_offset", "deq_scale", "quant_bias")
        return W8A8Int8Scheme(
            self.layer_name,
            weight_per_channel=True,
            static_input=True,
            input_symmetric=symmetric,
            files=self.files,
            shards=self.shards,
        )


class ModelSlimWeightOnly(_ModelSlimScheme):
    """W8A16 / W4A16 -> WNA16Scheme."""

    serves = ((MODELSLIM_FORMAT, "W8A16"), (MODELSLIM_FORMAT, "W4A16"))

    tensor_names = ("weight", "weight_scale")

    def __init__(self, layer_name, *, num_bits, group_size, packed, files=None, shards=None):
        super().__init__(layer_name, files, shards)
        self.num_bits = num_bits
        self.group_size = group_size or -1
        self.packed = packed
        self.label = f"W{num_bits}A16"

    def packed_dim(self) -> int | None:
        """Dim holding two int4 per int8 (None: one value per int8)."""
        return (0 if self.group_size != -1 else 1) if self.packed else None

    def checkpoint_tensors(self, out_features, in_features):
        shape = [out_features, in_features]
        if self.packed_dim() is not None:
            shape[self.packed_dim()] //= 2
        n_groups, _ = int_weights.group_layout(self, self.group_size, in_features, in_features)
        groups = ((out_features, n_groups),)
        return {
            "weight": TensorSpec((torch.int8,), (tuple(shape),)),
            "weight_scale": TensorSpec(FLOAT_DTYPES, groups, scale=True),
            "weight_offset": TensorSpec(FLOAT_DTYPES, groups, required=False),
        }

    def create_weights(
        self,
        layer,
        input_size,
        input_size_per_partition,
        output_partition_sizes,
        output_size,
        params_dtype,
        weight_loader,
    ):
        out = int_weights.setup_layer(
            layer, input_size, input_size_per_partition, output_partition_sizes, output_size, params_dtype
        )
        n_groups, partition_groups = int_weights.group_layout(
            self, self.group_size, input_size, input_size_per_partition
        )
        w_loader = self.loader(weight_loader, "weight", (torch.int8,))
        if not self.packed:
            layer.register_parameter(
                "weight",
                ModelWeightParameter(
                    data=torch.empty(out, input_size_per_partition, dtype=torch.int8),
                    input_dim=1,
                    output_dim=0,
                    weight_loader=w_loader,
                ),
            )
        else:  # two int4 per int8: along the output dim per group, the input dim per channel
            dim = 0 if self.group_size != -1 else 1
            shape = [out, input_size_per_partition]
            if shape[dim] % 2:
                raise CheckpointError(f"{self.where('weight')}: packed int4 needs an even size, got {shape}")
            shape[dim] //= 2
            layer.register_parameter(
                "weight",
                PackedvLLMParameter(
                    data=torch.empty(*shape, dtype=torch.int8),
                    input_dim=1,
                    output_dim=0,
                    packed_dim=dim,
                    packed_factor=2,
                    weight_loader=w_loader,
                ),
            )
        for name in ("weight_scale", "weight_offset"):
            args = dict(
                data=torch.zeros(out, n_groups, dtype=torch.float32),
                weight_loader=self.loader(weight_loader, name, FLOAT_DTYPES),
            )
            layer.register_parameter(
                name,
                GroupQuantScaleParameter(output_dim=0, input_dim=1, **args)
                if partition_groups
                else ChannelQuantScaleParameter(output_dim=0, **args),
            )

    def _int_weight(self, layer) -> torch.Tensor:
        w = layer.weight.data
        if self.packed:  # Ascend/msmodelslim format/common/pack.py _pack_int4: low nibble first
            lo = (w.to(torch.int16) << 12 >> 12).to(torch.int8)  # sign-extend the low nibble
            hi = (w >> 4).to(torch.int8)  # arithmetic shift keeps the sign of the high nibble
            dim = 0 if self.group_size != -1 else 1
            w = torch.stack((lo, hi), dim=dim + 1).flatten(dim, dim + 1)
        lo, hi = -(1 << (self.num_bits - 1)), (1 << (self.num_bits - 1)) - 1
        if int(w.min()) < lo or int(w.max()) > hi:
            raise CheckpointError(
                f"{self.where('weight')}: values must lie in [{lo}, {hi}] for {self.label}, "
                f"found [{int(w.min())}, {int(w.max())}]"
            )
        return w

    def translate(self, layer):
        w = self._int_weight(layer)
        offset = layer.weight_offset.data.double() if loaded(layer, "weight_offset") else None
        symmetric = offset is None or bool((offset == 0).all())
        zp = None
        if not symmetric:
            lo, hi = -(1 << (self.num_bits - 1)), (1 << (self.num_bits - 1)) - 1
            if bool((offset != offset.round()).any() or (offset < lo).any() or (offset > hi).any()):
                raise CheckpointError(
                    f"{self.where('weight_offset')}: must hold integers in [{lo}, {hi}] for {self.label}"
                )
            # compressed-tensors layout: int32 words packed along the output dim
            zp = pack_to_int32(offset.to(torch.int8), self.num_bits, packed_dim=0)
        set_param(layer, "weight_packed", pack_to_int32(w, self.num_bits, packed_dim=1))
        set_param(layer, "weight_zero_point", zp)
        set_param(layer, "weight_g_idx", None)
        set_param(layer, "weight_shape", torch.tensor(layer.full_weight_shape, dtype=torch.int64))
        set_param(layer, "weight_scale", layer.weight_scale.data.to(layer.params_dtype))
        drop(layer, "weight", "weight_offset")
        return WNA16Scheme(
            self.layer_name,
            num_bits=self.num_bits,
            group_size=None if self.group_size == -1 else self.group_size,
            symmetric=symmetric,
            files=self.files,
            shards=self.shards,
        )


__all__ = ["DESCRIPTION_FILE", "ModelSlimDescription", "is_description"]
