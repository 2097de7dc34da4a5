"""The small base every scheme derives from (modelled on vLLM's CompressedTensorsScheme)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from vllm_ptq_ascend.formats.plan import LayerPlan
from vllm_ptq_ascend.kernels import KernelConfig, LayerShape, LinearKernel, choose_kernel, token_switch
from vllm_ptq_ascend.validation import FLOAT_DTYPES, TensorSpec, checked_loader, require_loaded, where

# dtypes a checkpoint tensor of each role may arrive in.
SCALE_DTYPES = FLOAT_DTYPES


__all__ = ["SCALE_DTYPES", "LayerShape", "PtqScheme"]


class PtqScheme(ABC):
    """Creates a layer's parameters in checkpoint layout, then runs it through the kernel chosen
    for the layer (:func:`vllm_ptq_ascend.kernels.choose_kernel`)."""

    #: checkpoint tensors this scheme expects, in the order of error messages
    tensor_names: tuple[str, ...] = ()
    #: the plans this scheme serves, as (format, scheme) pairs; each class names its own
    serves: tuple[tuple[str, str], ...] = ()
    #: token_switch's key for a kernel that switches path by token count (set in prepare), else None
    switch_key: int | None = None

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

    #: the layer's kernel, chosen in create_weights (in the process that runs the layer)
    kernel: LinearKernel | None = None

    def kernel_spec(self, shape: LayerShape):
        """What this layer asks of a kernel (a spec of vllm_ptq_ascend.kernels.base)."""
        raise NotImplementedError(f"{type(self).__name__} runs no kernel of its own")

    def choose_kernel(self, shape: LayerShape) -> LinearKernel:
        """Choose this layer's kernel (an error lists every candidate's reason)."""
        self.kernel = choose_kernel(KernelConfig(self.kernel_spec(shape), shape, self.layer_name))
        return self.kernel

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

    def prepare(self, layer: torch.nn.Module) -> None:
        """Hand the loaded tensors to the kernel for its layout."""
        self.kernel.process_weights_after_loading(layer)
        self.switch_key = (
            token_switch.register(self.kernel, layer) if self.kernel.switches_on_tokens else None
        )

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's forward pass: the kernel on 2-D activations."""
        # no reshape of 2-D input (vLLM's): a view between a norm and the kernel's quantization would
        # hide the pair from vLLM-Ascend's norm + quant fusion pass (test_ascend_norm_quant_fusion.py)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if self.switch_key is not None and torch.compiler.is_compiling():
            # one opaque op in the traced graph, so that it takes the kernel's branch per call
            out = torch.ops.vllm_ptq_ascend.token_switched_apply(x2, bias, self.switch_key)
        else:
            out = self.kernel.apply(layer, x2, bias)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """The tensors one unfused checkpoint layer (a shard) of this size must hold, by name
        (``inspect`` checks headers against them; mirrors what ``create_weights`` registers)."""
        raise NotImplementedError

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and `inspect`: the scheme and its settings."""
