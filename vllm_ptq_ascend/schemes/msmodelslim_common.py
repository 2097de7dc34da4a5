"""What every msModelSlim scheme shares: it registers msModelSlim's tensors under their checkpoint
names, translates them once loaded into what one of our compressed-tensors schemes holds, and runs
that scheme (``formats/msmodelslim.py`` describes the tensors of each label)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Callable

import torch
from vllm.model_executor.parameter import ChannelQuantScaleParameter

from vllm_ptq_ascend.schemes.base import LayerShape, PtqScheme
from vllm_ptq_ascend.validation import CheckpointError, require_loaded


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


def unpack_int4_pairs(w: torch.Tensor, dim: int) -> torch.Tensor:
    """int8 holding two int4 values along ``dim`` -> one int4 value per int8, twice as long along
    ``dim``; the low nibble comes first (msModelSlim ``format/common/pack.py`` ``_pack_int4``)."""
    lo = (w.to(torch.int16) << 12 >> 12).to(torch.int8)  # sign-extend the low nibble
    hi = (w >> 4).to(torch.int8)  # arithmetic shift keeps the sign of the high nibble
    return torch.stack((lo, hi), dim=dim + 1).flatten(dim, dim + 1)


class _ModelSlimScheme(PtqScheme):
    """Registers msModelSlim tensors, translates them after loading into the tensors one of our
    compressed-tensors schemes holds (``translate``), then runs that scheme, ``self.inner``, with
    the kernel chosen for it. Subclasses' ``create_weights`` record the layer's ``shape``."""

    label = ""
    inner = None  # a PtqScheme, or any object with validate_loaded / prepare / apply_weights / describe
    shape: LayerShape | None = None

    def describe(self) -> str:
        inner = f" -> {self.inner.describe()}" if self.inner is not None else ""
        return f"msModelSlim {self.label}{inner}"

    def process_weights_after_loading(self, layer):
        require_loaded(layer, self.layer_name, self.tensor_names, self.files, self.shards)
        self.serve_translated(layer, self.shape)

    def serve_translated(self, layer: torch.nn.Module, shape: LayerShape) -> None:
        """Translate the loaded tensors, choose the inner scheme's kernel for ``shape``, prepare it."""
        self.shape = shape  # the layer as served (vLLM-Ascend's adapters see it only now)
        self.inner = self.translate(layer)
        if isinstance(self.inner, PtqScheme):
            self.inner.choose_kernel(shape)
        self.inner.validate_loaded(layer)
        self.inner.prepare(layer)

    @abstractmethod
    def translate(self, layer):
        """Rewrite the loaded msModelSlim tensors of ``layer``; returns the scheme that runs them."""

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
