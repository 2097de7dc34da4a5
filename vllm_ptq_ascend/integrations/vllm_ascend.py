"""Our linear schemes in vLLM-Ascend's scheme registry, for msModelSlim labels it has no linear scheme for.

The upstream sources it follows and the layouts in detail: ``docs/sources.md``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_ptq_ascend.integrations.vllm_ascend_layers import (
    layer_under_construction,
    narrowed_names,
    noop_loader,
    quant_description,
)
from vllm_ptq_ascend.schemes.base import LayerShape

logger = logging.getLogger(__name__)

METHODS_MODULE = "vllm_ascend.quantization.methods"
LAYER_TYPE = "linear"
REGISTRY_API = ("register_scheme", "get_scheme_class")

_PTQ_ADAPTER = "_ptq_ascend_adapter"  # marks our classes, so repeated registration is a no-op


def refuse_embedding(layer: torch.nn.Module | None, prefix: str, quant_type: str) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from vllm_ptq_ascend.validation import CheckpointError

    if isinstance(layer, VocabParallelEmbedding):
        raise CheckpointError(
            f"quant_model_description.json: layer '{prefix}' is an embedding labelled {quant_type!r}; "
            "vLLM-Ascend resolves it through the linear scheme for that label, which vllm-ptq-ascend "
            "serves for linear layers only (label the embedding FLOAT, or serve with "
            "--quantization ptq_ascend)"
        )


def _description_group_size(desc: dict[str, Any], default: int = 0) -> int:
    from vllm_ptq_ascend.validation import CheckpointError

    group_size = desc.get("group_size", default)  # 0: per channel, as msModelSlim writes it
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise CheckpointError(
            f"quant_model_description.json: 'group_size' must be an integer >= 0, found {group_size!r}"
        )
    return group_size


class _MsModelSlimLinearAdapter:
    """A vLLM-Ascend linear scheme (constructed with no arguments, one per layer) around one of our
    msModelSlim schemes: its tensors are created on a scratch module by the scheme's create_weights,
    handed to vLLM-Ascend by name, translated and run by the scheme once loaded."""

    quant_type = ""
    _ptq_ascend_adapter = True

    def __init__(self) -> None:
        desc = quant_description()
        layer, self.prefix = layer_under_construction()
        refuse_embedding(layer, self.prefix, self.quant_type)
        self._layer = layer
        self.version = str(desc.get("version", "0"))
        self.scheme = self._make_scheme(desc)
        self.scratch = torch.nn.Module()  # the msModelSlim tensors, as our scheme creates them
        self.row_tp = 1  # >1: some tensors loaded whole on a row-parallel rank, cut after loading
        self.row_whole: dict[str, int] = {}  # name -> columns this rank keeps, for those tensors
        self.names: list[str] = []  # every tensor handed to vLLM-Ascend

    def tp_size(self) -> int:
        """The layer's own tensor-parallel size (its TP group may not be the global one)."""
        size = getattr(self._layer, "tp_size", None)
        if isinstance(size, int):
            return size
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()

    def _make_scheme(self, desc: dict[str, Any]):
        raise NotImplementedError

    def _perchannel_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _pergroup_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _row_tensors(self, layer_type: str | None) -> dict[str, torch.Tensor]:
        """Per-group tensors whose row-parallel full width vLLM-Ascend loads on every rank."""
        return {n: getattr(self.scratch, n).data for n in self._pergroup_names()}

    def _hand_over(self, tensors: dict[str, Any]) -> dict[str, Any]:
        self.names += [n for n in tensors if not n.startswith("_")]
        return tensors

    def get_weight(self, input_size: int, output_size: int, params_dtype: torch.dtype) -> dict[str, Any]:
        shape = LayerShape(input_size, output_size, input_size, (output_size,), params_dtype)
        self.scheme.create_weights(self.scratch, shape, noop_loader)
        w = self.scratch.weight
        out = {"weight": w.data}
        # two int4 per int8 (msModelSlim 1.0.0), for vLLM's fused-shard offsets
        if getattr(self.scheme, "packed", False):
            out["_packed_dim"], out["_packed_factor"] = w.packed_dim, w.packed_factor
        return self._hand_over(out)

    def get_pertensor_param(self, params_dtype: torch.dtype, **kwargs: Any) -> dict[str, Any]:
        return {}

    def get_perchannel_param(self, output_size: int, params_dtype: torch.dtype) -> dict[str, Any]:
        return self._hand_over({n: getattr(self.scratch, n).data for n in self._perchannel_names()})

    def get_pergroup_param(
        self, input_size: int, output_size: int, params_dtype: torch.dtype, layer_type: str | None = None
    ) -> dict[str, Any]:
        tensors = self._row_tensors(layer_type)
        if layer_type == "row" and tensors and self.tp_size() > 1:
            self.row_tp = self.tp_size()
            narrowed = narrowed_names("get_pergroup_param", tuple(tensors))
            # the others are loaded whole by vLLM's row loader: every rank holds all columns
            whole = {n: t for n, t in tensors.items() if n not in narrowed}
            self.row_whole = {n: t.shape[1] for n, t in whole.items()}
            tensors |= {n: t.new_zeros(t.shape[0], t.shape[1] * self.row_tp) for n, t in whole.items()}
        return self._hand_over(tensors)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from vllm_ptq_ascend.schemes import int_weights
        from vllm_ptq_ascend.schemes.msmodelslim_common import set_param
        from vllm_ptq_ascend.validation import CheckpointError

        s = self.scratch
        name = getattr(layer, "prefix", "") or type(layer).__name__
        self.scheme.layer_name, self.scheme.shards = name, [name]
        out_f = s.output_size_per_partition
        shape = LayerShape(
            input_size=s.input_size_per_partition * self.row_tp,
            output_size=getattr(layer, "output_size", out_f),
            input_size_per_partition=s.input_size_per_partition,
            output_partition_sizes=tuple(getattr(layer, "output_partition_sizes", None) or [out_f]),
            params_dtype=s.params_dtype,
            input_shard=getattr(layer, "tp_rank", 0) if self.row_tp > 1 else 0,
        )
        int_weights.setup_layer(layer, shape)
        if self.row_whole:  # keep this rank's columns, as the row loader kept its input columns
            rank = getattr(layer, "tp_rank", 0)
            for n, cols in self.row_whole.items():
                full = getattr(layer, n).data
                if full.shape[1] != cols * self.row_tp:
                    raise CheckpointError(
                        f"{self.scheme.where(n)}: {full.shape[1]} columns, expected {cols * self.row_tp}"
                    )
                set_param(layer, n, full[:, rank * cols : (rank + 1) * cols].contiguous())
        # vLLM-Ascend's loader tracks nothing; tensors not in the file keep the scratch zeros
        for n in self.names:
            if self._arrived(layer, n):
                getattr(layer, n).ptq_loaded_shards = {None}
        self.scheme.serve_translated(layer, shape)

    def _arrived(self, layer: torch.nn.Module, name: str) -> bool:
        """Whether the checkpoint held tensor ``name`` (vLLM-Ascend records nothing: assume it did)."""
        return True

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        tp_rank: int | None = 0,
    ) -> torch.Tensor:
        # bias: vLLM passes a row-parallel layer's bias on rank 0 only, so it is added as given
        return self.scheme.apply_weights(layer, x, bias)


class MsModelSlimW4A16Linear(_MsModelSlimLinearAdapter):
    """vLLM-Ascend linear scheme for msModelSlim W4A16: ``weight_scale`` / ``weight_offset`` per
    channel, or per group (whole on a row-parallel rank)."""

    quant_type = "W4A16"

    def _make_scheme(self, desc):
        from vllm_ptq_ascend.schemes.msmodelslim_weight_only import ModelSlimWeightOnly

        return ModelSlimWeightOnly(
            "", num_bits=4, group_size=_description_group_size(desc), packed=self.version == "1.0.0"
        )

    @property
    def per_group(self) -> bool:
        return self.scheme.group_size != -1

    def _perchannel_names(self):
        return () if self.per_group else ("weight_scale", "weight_offset")

    def _pergroup_names(self):
        return ("weight_scale", "weight_offset") if self.per_group else ()


class MsModelSlimW4A8DynamicLinear(_MsModelSlimLinearAdapter):
    """vLLM-Ascend linear scheme for msModelSlim W4A8_DYNAMIC (schemes/msmodelslim_w4a8.py): first-level
    ``weight_scale`` / ``weight_offset`` per channel; ``weight_scale_second`` /
    ``weight_offset_second`` per group and ``scale_bias`` ([out, 1], or [out, 16] for
    ``layer_type == "row"`` as vLLM-Ascend's removed linear created it) from get_pergroup_param."""

    quant_type = "W4A8_DYNAMIC"

    def _make_scheme(self, desc):
        from vllm_ptq_ascend.formats.msmodelslim import w4a8_group_size
        from vllm_ptq_ascend.schemes.msmodelslim_w4a8 import ModelSlimW4A8Dynamic

        _description_group_size(desc)  # type check
        return ModelSlimW4A8Dynamic(
            "", group_size=w4a8_group_size(desc, self.version), version=self.version, row_parallel=False
        )

    def _perchannel_names(self):
        return ("weight_scale", "weight_offset")

    def _pergroup_names(self):
        return ("weight_scale_second", "weight_offset_second") if self.scheme.per_group else ()

    def _row_tensors(self, layer_type):
        from vllm_ptq_ascend.schemes.msmodelslim_w4a8 import ROW_SCALE_BIAS_COLS
        from vllm_ptq_ascend.validation import CheckpointError

        tensors = super()._row_tensors(layer_type)
        if self.scheme.packed:
            sb = self.scratch.scale_bias.data
            if layer_type == "row":
                tp = self.tp_size()
                if ROW_SCALE_BIAS_COLS % tp:
                    raise CheckpointError(
                        f"quant_model_description.json: W4A8_DYNAMIC scale_bias of a row-parallel layer has "
                        f"{ROW_SCALE_BIAS_COLS} columns, which {tp} tensor-parallel ranks cannot split"
                    )
                sb = sb.new_zeros(sb.shape[0], ROW_SCALE_BIAS_COLS // tp)  # this rank's columns
            tensors["scale_bias"] = sb
        return tensors


class _FlatQuantAdapter:
    """The FlatQuant transform tensors, handed over from get_pertensor_param as vLLM-Ascend's
    W4A4_FLATQUANT_DYNAMIC scheme does (mixed into an adapter above)."""

    TRANSFORM = ("left_trans", "right_trans", "clip_ratio")

    def get_pertensor_param(self, params_dtype: torch.dtype, **kwargs: Any) -> dict[str, Any]:
        tp = self.tp_size()
        if kwargs.get("layer_type") == "row" and tp > 1:
            from vllm_ptq_ascend.schemes.msmodelslim_flatquant import modelslim_factor_sizes

            # vLLM's row loader loads these whole on every rank (vLLM-Ascend gives them no input_dim):
            # sized for the whole layer; the scheme keeps this rank's diagonal block of left_trans
            self.row_tp = tp
            sizes = modelslim_factor_sizes(self.scratch.input_size_per_partition * tp)
            for name, n in zip(("left_trans", "right_trans"), sizes):
                getattr(self.scratch, name).data = torch.zeros(n, n, dtype=torch.float32)
        return self._hand_over({n: getattr(self.scratch, n).data for n in self.TRANSFORM})

    def _arrived(self, layer: torch.nn.Module, name: str) -> bool:
        # a right_trans absent from the checkpoint (o_proj) keeps the zeros handed over
        return name != "right_trans" or bool(getattr(layer, name).data.any())

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        global _FUSED_CLIP_NOTED
        if len(getattr(layer, "output_partition_sizes", None) or ()) > 1 and not _FUSED_CLIP_NOTED:
            _FUSED_CLIP_NOTED = True
            logger.warning(
                "vllm-ptq-ascend: under vLLM-Ascend's loader a fused FlatQuant layer (%s) keeps one "
                "clip_ratio, the last shard's, where msModelSlim learned one per shard; ptq_ascend's own "
                "config (--quantization ptq_ascend) serves each shard's",
                getattr(layer, "prefix", "") or type(layer).__name__,
            )
        super().process_weights_after_loading(layer)


_FUSED_CLIP_NOTED = False


class MsModelSlimW8A8FlatQuantLinear(_FlatQuantAdapter, _MsModelSlimLinearAdapter):
    """vLLM-Ascend linear scheme for msModelSlim W8A8_FLATQUANT_DYNAMIC (schemes/msmodelslim_flatquant.py):
    ``weight`` int8 [out, in], ``weight_scale`` / ``weight_offset`` [out, 1], the transform tensors."""

    quant_type = "W8A8_FLATQUANT_DYNAMIC"

    def _make_scheme(self, desc):
        from vllm_ptq_ascend.schemes.msmodelslim_flatquant import ModelSlimFlatQuant

        return ModelSlimFlatQuant("", label=self.quant_type)

    def _perchannel_names(self):
        return ("weight_scale", "weight_offset")

    def _pergroup_names(self):
        return ()


class MsModelSlimW4A8FlatQuantLinear(_FlatQuantAdapter, MsModelSlimW4A8DynamicLinear):
    """vLLM-Ascend linear scheme for msModelSlim W4A8_FLATQUANT_DYNAMIC: W4A8_DYNAMIC's per-channel
    "1.0.0" tensors (packed ``weight``, ``scale_bias``) and the transform tensors."""

    quant_type = "W4A8_FLATQUANT_DYNAMIC"

    def _make_scheme(self, desc):
        from vllm_ptq_ascend.schemes.msmodelslim_flatquant import ModelSlimFlatQuantW4A8

        return ModelSlimFlatQuantW4A8("", version=self.version, row_parallel=False)


class RegisteredScheme:
    """What we register for a key. Built with no arguments like every vLLM-Ascend scheme, it runs
    our msModelSlim adapter under a msModelSlim description, and under vLLM-Ascend's
    compressed-tensors config (an llmcompressor checkpoint) our compressed-tensors scheme."""

    _ptq_ascend_adapter = True
    modelslim: type = _MsModelSlimLinearAdapter
    serves_compressed_tensors = False

    def __init__(self) -> None:
        from vllm_ptq_ascend.integrations.vllm_ascend_ct import CompressedTensorsLinear, is_compressed_tensors
        from vllm_ptq_ascend.validation import CheckpointError

        quant_type = self.modelslim.quant_type
        if not is_compressed_tensors(quant_description()):
            self.impl = self.modelslim()
        elif self.serves_compressed_tensors:
            self.impl = CompressedTensorsLinear(quant_type)
        else:
            _, prefix = layer_under_construction()
            raise CheckpointError(
                f"config.json: layer '{prefix}': vLLM-Ascend resolved a compressed-tensors group to "
                f"{quant_type!r}, which vllm-ptq-ascend serves for msModelSlim checkpoints only; serve "
                "this checkpoint with --quantization ptq_ascend"
            )

    def get_weight(self, *args, **kwargs):
        return self.impl.get_weight(*args, **kwargs)

    def get_pertensor_param(self, *args, **kwargs):
        return self.impl.get_pertensor_param(*args, **kwargs)

    def get_perchannel_param(self, *args, **kwargs):
        return self.impl.get_perchannel_param(*args, **kwargs)

    def get_pergroup_param(self, *args, **kwargs):
        return self.impl.get_pergroup_param(*args, **kwargs)

    def process_weights_after_loading(self, layer):
        return self.impl.process_weights_after_loading(layer)

    def apply(self, layer, x, bias=None, tp_rank=0):
        return self.impl.apply(layer, x, bias, tp_rank)


ADAPTERS = {  # key -> (msModelSlim adapter, whether compressed-tensors groups of that type are served)
    (MsModelSlimW4A16Linear.quant_type, LAYER_TYPE): (MsModelSlimW4A16Linear, True),
    (MsModelSlimW4A8DynamicLinear.quant_type, LAYER_TYPE): (MsModelSlimW4A8DynamicLinear, True),
    (MsModelSlimW8A8FlatQuantLinear.quant_type, LAYER_TYPE): (MsModelSlimW8A8FlatQuantLinear, False),
    (MsModelSlimW4A8FlatQuantLinear.quant_type, LAYER_TYPE): (MsModelSlimW4A8FlatQuantLinear, False),
}


def registered_class(key: tuple[str, str], base: type | None = None) -> type:
    """The class we register for ``key`` (a subclass of vLLM-Ascend's scheme base, where given)."""
    adapter, ct = ADAPTERS[key]
    bases = (RegisteredScheme, base) if isinstance(base, type) else (RegisteredScheme,)
    name = "PtqAscend" + adapter.__name__.removeprefix("MsModelSlim")
    return type(name, bases, {"modelslim": adapter, "serves_compressed_tensors": ct, "__module__": __name__})


def register_ascend_schemes() -> list[tuple[str, str]]:
    """Add our adapters to vLLM-Ascend's registry for keys it has no scheme for; returns the keys added.

    Does nothing without vLLM-Ascend, warns and skips if its registry API differs, and is
    idempotent (a key that already holds our class is left as it is).
    """
    import importlib.util

    try:
        present = importlib.util.find_spec("vllm_ascend") is not None
    except (ImportError, ValueError):
        present = False
    if not present:
        logger.debug("vllm-ptq-ascend: vLLM-Ascend is not installed; no schemes registered with it")
        return []
    try:
        methods = importlib.import_module(METHODS_MODULE)
    except Exception as e:  # vLLM-Ascend installed but broken: say what is lost, never break start-up
        logger.error(
            "vllm-ptq-ascend: vLLM-Ascend is installed but importing %s failed (%r): vllm-ptq-ascend's "
            "schemes for %s are NOT registered with it, so msModelSlim checkpoints with those labels and "
            "llmcompressor W4A16/W4A8 checkpoints will not be served through vLLM-Ascend's own configs "
            "(--quantization ptq_ascend still works)",
            METHODS_MODULE,
            e,
            ", ".join(f"({q}, {t})" for q, t in ADAPTERS),
        )
        return []
    missing = [n for n in REGISTRY_API if not callable(getattr(methods, n, None))]
    if missing:
        logger.warning(
            "vllm-ptq-ascend: %s has no %s; not registering our linear schemes with vLLM-Ascend",
            METHODS_MODULE,
            ", ".join(missing),
        )
        return []
    base = getattr(methods, "AscendLinearScheme", None)
    added = []
    for key in ADAPTERS:
        existing = methods.get_scheme_class(*key)
        if existing is not None:
            if not getattr(existing, _PTQ_ADAPTER, False):
                logger.info(
                    "vllm-ptq-ascend: vLLM-Ascend already has %s for %s; leaving it", existing.__name__, key
                )
            continue
        cls = registered_class(key, base)
        try:
            methods.register_scheme(*key)(cls)
        except ValueError as e:  # registered meanwhile
            logger.info("vllm-ptq-ascend: not registering %s with vLLM-Ascend: %s", key, e)
            continue
        added.append(key)
        logger.info("vllm-ptq-ascend: registered %s with vLLM-Ascend for %s", cls.__name__, key)
    return added
