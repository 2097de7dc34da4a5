"""The kernel interface every scheme calls; one implementation per platform.

Schemes own the parameters in checkpoint layout (compressed-tensors: weights
[out, in], scales [out, groups]). A backend reshapes them once in its
``prepare_*`` hook (transpose, repack, prepack handles) and then serves three
operations: dynamic/static int8 activation quantization, the int8 x int8
matmul with dequantization (int8 or int4 weights), and the weight-only matmul. Adding a platform means
adding a backend file, never touching a scheme.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Int8LinearSpec:
    """What an int8-weight, int8-activation layer needs from a backend."""

    weight_per_channel: bool  # False: one scale per logical shard (per-tensor)
    static_input: bool  # activation scale from the checkpoint, else per-token dynamic
    input_symmetric: bool


@dataclass(frozen=True)
class WeightOnlySpec:
    """What a weight-only (W4A16 / W8A16) layer needs from a backend."""

    num_bits: int
    group_size: int  # -1: one group spanning the whole input (per-channel)
    symmetric: bool
    has_g_idx: bool  # GPTQ act-order: input channels are grouped by g_idx, not by position


@dataclass(frozen=True)
class W4A8Spec:
    """What a W4A8 layer needs: symmetric int4 weights, int8 per-token dynamic activations.

    The layer arrives with ``weight_packed`` (pack-quantized) or ``weight`` (int8 storage,
    int-quantized) and ``weight_scale`` [out, groups]; activations are quantized by
    :meth:`KernelBackend.quant_act_int8` as for dynamic W8A8.
    """

    group_size: int  # -1: one group spanning the whole input (per-channel)


@dataclass(frozen=True, eq=False)
class OnlineKronecker:
    """FlatQuant's online transform of a layer's input: x -> x·(left ⊗ right), then each token
    clipped to ``clip_ratio`` of its max (the factors as the checkpoint holds them)."""

    left: torch.Tensor  # [n1, n1]
    right: torch.Tensor  # [n2, n2]
    clip_ratio: float

    @property
    def sizes(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[0])

    def float(self) -> "OnlineKronecker":
        """The factors in float32 (a backend that transforms in float32 whatever the model dtype)."""
        return OnlineKronecker(self.left.float(), self.right.float(), self.clip_ratio)


@dataclass(frozen=True)
class IntDynamicSpec:
    """Symmetric per-channel int weights, activations quantized per token at run time.

    For W4A4 and FlatQuant (W4A4/W4A8/W8A8). The layer arrives with ``weight`` int8 [out, in]
    (values within ``weight_bits``) and ``weight_scale`` [out, 1]. An activation row x is
    quantized as ``s = clip * max|x| / qmax``, ``q = clamp(round(x / s), -qmax - 1, qmax)``
    with ``qmax = 2**(act_bits - 1) - 1`` (npu_dynamic_quant's and vLLM's int8 convention,
    FlatQuant's quantizer). With a ``transform`` the row is first transformed online,
    x -> vec(L^T · X · R) with X = x viewed as [n1, n2] (i.e. x · (L ⊗ R)), and clipped.
    """

    weight_bits: int  # 4 or 8
    act_bits: int  # 4 or 8
    transform: OnlineKronecker | None = None

    @property
    def act_qmax(self) -> int:
        return (1 << (self.act_bits - 1)) - 1

    @property
    def kronecker(self) -> tuple[int, int] | None:
        """(n1, n2) of the online transform, or None."""
        return None if self.transform is None else self.transform.sizes


class KernelBackend(ABC):
    """One platform's implementation of the quantized linear operations."""

    name: str = "abstract"

    # -- W8A8 ---------------------------------------------------------------
    @abstractmethod
    def prepare_int8(self, layer: torch.nn.Module, spec: Int8LinearSpec) -> None:
        """Turn the loaded checkpoint tensors of ``layer`` into this backend's layout."""

    @abstractmethod
    def quant_act_int8(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Quantize 2-D activations to int8: (x_q, scale, zero_point or None).

        Per-token dynamic scales unless the layer carries static ones.
        """

    @abstractmethod
    def int8_mm(
        self,
        layer: torch.nn.Module,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        x_zp: torch.Tensor | None,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """int8 x int8 matmul, dequantized to ``out_dtype``, plus bias."""

    # -- W4A8 ----------------------------------------------------------------
    @abstractmethod
    def prepare_w4a8(self, layer: torch.nn.Module, spec: W4A8Spec) -> None:
        """Turn the loaded int4 weights and scales into this backend's layout.

        Afterwards :meth:`quant_act_int8` must quantize per token (symmetric, dynamic).
        """

    @abstractmethod
    def w4a8_mm(
        self,
        layer: torch.nn.Module,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """int8 activations (per-token ``x_scale``) x int4 weights, dequantized, plus bias."""

    # -- W4A4 / FlatQuant: dynamic int activations of act_bits, optional online transform --
    @abstractmethod
    def prepare_int_dynamic(self, layer: torch.nn.Module, spec: IntDynamicSpec) -> None:
        """Turn the loaded int weight, scales (and transform factors) into this backend's layout."""

    @abstractmethod
    def quant_act_dynamic(self, layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform (if the layer has one), clip and quantize 2-D activations per token:
        (x_q in this backend's layout for :meth:`int_dynamic_mm`, per-token scale)."""

    @abstractmethod
    def int_dynamic_mm(
        self,
        layer: torch.nn.Module,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Quantized activations x int weights, dequantized to ``out_dtype``, plus bias."""

    # -- W4A16 / W8A16 ------------------------------------------------------
    @abstractmethod
    def prepare_weight_only(self, layer: torch.nn.Module, spec: WeightOnlySpec) -> None:
        """Turn the loaded packed weights, scales, zero points, g_idx into this backend's layout."""

    @abstractmethod
    def weight_only_mm(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Matmul of float activations with the quantized weight of ``layer``."""
