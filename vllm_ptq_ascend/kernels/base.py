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


@dataclass(frozen=True)
class IntDynamicSpec:
    """Symmetric per-channel int weights, activations quantized per token at run time.

    For W4A4 and FlatQuant (W4A4/W4A8/W8A8). The layer arrives with ``weight`` int8 [out, in]
    (values within ``weight_bits``) and ``weight_scale`` [out, 1]. An activation row x is
    quantized as ``s = clip * max|x| / qmax``, ``q = clamp(round(x / s), -qmax - 1, qmax)``
    with ``qmax = 2**(act_bits - 1) - 1`` (npu_dynamic_quant's and vLLM's int8 convention,
    FlatQuant's quantizer). With ``kronecker`` = (n1, n2) the row is first transformed online,
    x -> vec(L^T · X · R) with X = x viewed as [n1, n2] (i.e. x · (L ⊗ R)), from the layer's
    ``ptq_left`` [n1, n1], ``ptq_right`` [n2, n2] and ``ptq_clip_ratio`` (a float).
    """

    weight_bits: int  # 4 or 8
    act_bits: int  # 4 or 8
    kronecker: tuple[int, int] | None = None

    @property
    def act_qmax(self) -> int:
        return (1 << (self.act_bits - 1)) - 1


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
