"""The small base every scheme derives from (modelled on vLLM's CompressedTensorsScheme)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from vllm_ptq_ascend.formats.plan import LayerPlan
from vllm_ptq_ascend.kernels import KernelBackend, get_backend
from vllm_ptq_ascend.validation import FLOAT_DTYPES, TensorSpec, checked_loader, require_loaded, where

# dtypes a checkpoint tensor of each role may arrive in.
SCALE_DTYPES = FLOAT_DTYPES


@dataclass(frozen=True)
class LayerShape:
    """A linear layer's geometry, built once from vLLM's ``create_weights`` arguments: the whole
    layer's ``input_size`` x ``output_size`` and this rank's part of it."""

    input_size: int
    output_size: int
    input_size_per_partition: int
    output_partition_sizes: tuple[int, ...]  # one per fused shard (q/k/v, gate/up)
    params_dtype: torch.dtype

    @property
    def out_features(self) -> int:
        """This rank's output features, every shard together."""
        return sum(self.output_partition_sizes)


class PtqScheme(ABC):
    """Creates a layer's parameters in checkpoint layout, then runs it through a kernel backend."""

    #: checkpoint tensors this scheme expects, in the order of error messages
    tensor_names: tuple[str, ...] = ()
    #: the plans this scheme serves, as (format, scheme) pairs; each class names its own
    serves: tuple[tuple[str, str], ...] = ()

    @classmethod
    def matches(cls, plan: LayerPlan) -> bool:
        """True if this scheme serves ``plan`` (a subclass does not inherit its parent's plans)."""
        return (plan.format, plan.scheme) in cls.__dict__.get("serves", ())

    def __init__(
        self,
        layer_name: str,
        files: dict[str, str] | None = None,
        shards: list[str] | None = None,
    ):
        self.layer_name = layer_name
        self.files = files or {}
        # checkpoint names behind this vLLM layer (q/k/v_proj for qkv_proj)
        self.shards = shards or [layer_name]

    _kernels: KernelBackend | None = None

    @property
    def kernels(self) -> KernelBackend:
        # Resolved once, in the process that runs the layer (configs are pickled to workers).
        if self._kernels is None:
            self._kernels = get_backend()
        return self._kernels

    def loader(self, inner: Callable, tensor: str, dtypes) -> Callable:
        return checked_loader(
            inner,
            layer_name=self.layer_name,
            tensor=tensor,
            dtypes=dtypes,
            files=self.files,
            shards=self.shards,
        )

    def where(self, tensor: str) -> str:
        return where(self.files, self.layer_name, tensor, self.shards)

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, shape: LayerShape, weight_loader: Callable) -> None:
        """Register the checkpoint's tensors on ``layer`` as vLLM parameters."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        require_loaded(layer, self.layer_name, self.tensor_names, self.files, self.shards)
        self.validate_loaded(layer)
        self.prepare(layer)

    def validate_loaded(self, layer: torch.nn.Module) -> None:
        """Value checks on the loaded tensors (scales > 0 and finite, ...)."""

    @abstractmethod
    def prepare(self, layer: torch.nn.Module) -> None:
        """Hand the loaded tensors to the kernel backend for its layout."""

    @abstractmethod
    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The layer's forward pass."""

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """The tensors one unfused checkpoint layer (a shard) of this size must hold, by name
        (``inspect`` checks headers against them; mirrors what ``create_weights`` registers)."""
        raise NotImplementedError

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and `inspect`: the scheme and its settings."""
