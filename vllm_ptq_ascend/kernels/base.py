"""What a kernel is told about a layer, and the small interface every kernel implements.

A scheme describes its layer in a frozen spec (one spec type per kernel family: int8 x int8,
W4A8, int x int with an optional online transform, weight-only) and the layer's
:class:`LayerShape`; :func:`vllm_ptq_ascend.kernels.choose_kernel` asks each candidate kernel of
the platform, in order, whether it ``can_implement`` that config, and the first that can is
built for the layer. The kernel then turns the loaded checkpoint tensors (compressed-tensors
layout: weights [out, in], scales [out, groups]) into its own layout once and keeps whatever it
derives on itself; schemes never read a kernel's state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class LayerShape:
    """A linear layer's geometry, built once from vLLM's ``create_weights`` arguments: the whole
    layer's ``input_size`` x ``output_size`` and this rank's part of it."""

    input_size: int
    output_size: int
    input_size_per_partition: int
    output_partition_sizes: tuple[int, ...]  # one per fused shard (q/k/v, gate/up)
    params_dtype: torch.dtype
    #: which of the input's equal slices this rank holds (a row-parallel layer's tensor-parallel rank)
    input_shard: int = 0

    @property
    def out_features(self) -> int:
        """This rank's output features, every shard together."""
        return sum(self.output_partition_sizes)

    @property
    def input_shards(self) -> int:
        """Into how many slices the input is split across ranks (1: this rank sees all of it)."""
        return self.input_size // self.input_size_per_partition


@dataclass(frozen=True)
class Int8LinearSpec:
    """An int8-weight, int8-activation layer (W8A8)."""

    weight_per_channel: bool  # False: one scale per logical shard (per-tensor)
    static_input: bool  # activation scale from the checkpoint, else per-token dynamic
    input_symmetric: bool
    # the activations arrive already quantized (int8 storage, per-token scales) from a kernel that
    # quantizes them itself (an online transform, 4-bit grids): only the matmul is wanted
    quantized_input: bool = False


@dataclass(frozen=True)
class WeightOnlySpec:
    """A weight-only layer (W4A16 / W8A16)."""

    num_bits: int
    group_size: int  # -1: one group spanning the whole input (per-channel)
    symmetric: bool
    has_g_idx: bool  # GPTQ act-order: input channels are grouped by g_idx, not by position

    def group_width(self, in_features: int) -> int:
        """Input channels per weight scale: ``group_size``, or the whole input per channel."""
        return in_features if self.group_size == -1 else self.group_size


@dataclass(frozen=True)
class W4A8Spec:
    """Symmetric int4 weights, int8 per-token dynamic activations.

    The layer arrives with ``weight_packed`` (pack-quantized) or ``weight`` (int8 storage,
    int-quantized) and ``weight_scale`` [out, groups].
    """

    group_size: int  # -1: one group spanning the whole input (per-channel)


@dataclass(frozen=True)
class IntDynamicSpec:
    """Symmetric per-channel int weights, activations quantized per token at run time.

    For W4A4 and FlatQuant (W4A4/W4A8/W8A8). The layer arrives with ``weight`` int8 [out, in]
    (values within ``weight_bits``) or ``weight_packed``, and ``weight_scale`` [out, 1]. An
    activation row x is quantized as ``s = clip * max|x| / qmax``,
    ``q = clamp(round(x / s), -qmax - 1, qmax)`` with ``qmax = 2**(act_bits - 1) - 1``
    (npu_dynamic_quant's and vLLM's int8 convention, FlatQuant's quantizer). With an online
    transform of sizes ``kronecker`` = (n1, n2) the row is first transformed,
    x -> vec(L^T · X · R) with X = x viewed as [n1, n2] (i.e. x · (L ⊗ R)), and clipped; the
    factors themselves reach the kernel once loaded (:class:`OnlineKronecker`).
    """

    weight_bits: int  # 4 or 8
    act_bits: int  # 4 or 8
    kronecker: tuple[int, int] | None = None

    @property
    def act_qmax(self) -> int:
        return (1 << (self.act_bits - 1)) - 1


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
        """The factors in float32 (a kernel that transforms in float32 whatever the model dtype)."""
        return OnlineKronecker(self.left.float(), self.right.float(), self.clip_ratio)

    def right_or_none(self) -> torch.Tensor | None:
        """The right factor, or None where it is exactly the identity (o_proj per head: its
        within-head factor lives in v_proj), so a kernel can skip that product."""
        eye = torch.eye(self.right.shape[0], dtype=self.right.dtype, device=self.right.device)
        return None if torch.equal(self.right, eye) else self.right


Spec = Int8LinearSpec | WeightOnlySpec | W4A8Spec | IntDynamicSpec


@dataclass(frozen=True)
class KernelConfig:
    """Everything a kernel may look at to decide whether it can serve a layer."""

    spec: Spec
    shape: LayerShape
    layer_name: str = ""
    #: the platform whose candidates are asked (set by choose_kernel; composed kernels choose their
    #: inner kernel from the same lists)
    platform: str | None = None

    @property
    def in_features(self) -> int:
        return self.shape.input_size_per_partition

    @property
    def out_features(self) -> int:
        return self.shape.out_features

    @property
    def params_dtype(self) -> torch.dtype:
        return self.shape.params_dtype


class LinearKernel(ABC):
    """One way to run one family of quantized layers; one object per layer."""

    #: the spec type (kernel family) this kernel implements
    family: ClassVar[type]

    @classmethod
    @abstractmethod
    def can_implement(cls, config: KernelConfig) -> tuple[bool, str | None]:
        """(True, None), or (False, why not) in words that name what this kernel lacks."""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config

    @classmethod
    def fallback(cls, config: KernelConfig) -> bool:
        """True if choosing this kernel for ``config`` means a platform kernel could not take it
        (logged as a warning on platforms that say so)."""
        return False

    @property
    def spec(self):
        return self.config.spec

    @property
    def switches_on_tokens(self) -> bool:
        """True if the path a call takes depends on its token count: it then runs as one custom op
        (``token_switch``), so a compiled graph takes the branch per call."""
        return False

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Turn the loaded checkpoint tensors of ``layer`` into this kernel's layout."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for 2-D activations ``x``, in ``x``'s dtype, plus ``bias``."""


class Int8Kernel(LinearKernel):
    """int8 x int8 (W8A8). Also serves others' int8 weights: a kernel of another family that
    quantizes its activations itself builds one with ``quantized_input`` and calls :meth:`mm`."""

    family = Int8LinearSpec

    @abstractmethod
    def quantize_input(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """2-D activations -> (int8 values, scale, zero point or None), as the spec says."""

    @abstractmethod
    def mm(
        self,
        x_q: torch.Tensor,
        x_scale: torch.Tensor | None,
        x_zp: torch.Tensor | None,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Quantized activations x int8 weights, dequantized to ``out_dtype``, plus bias."""

    def apply(self, layer, x, bias):
        x_q, x_scale, x_zp = self.quantize_input(x)
        return self.mm(x_q, x_scale, x_zp, bias, x.dtype)


class IntDynamicKernel(LinearKernel):
    """W4A4 / FlatQuant: per-token dynamic int activations, optionally transformed online."""

    family = IntDynamicSpec
    transform: OnlineKronecker | None = None

    def set_transform(self, transform: OnlineKronecker | None) -> None:
        """The loaded factors of the online transform (before :meth:`process_weights_after_loading`)."""
        name, want = self.config.layer_name, self.spec.kronecker
        if transform is None or want is None:
            if transform is not None or want is not None:
                raise ValueError(
                    f"layer '{name}': online transform {transform} for a kernel built for {want}"
                )
            self.transform = None
            return
        n1, n2 = want
        left, right = tuple(transform.left.shape), tuple(transform.right.shape)
        if left != (n1, n1) or right != (n2, n2):
            raise ValueError(
                f"layer '{name}': Kronecker transform ({n1} x {n2}) with factors {left} and {right} "
                f"does not match {self.config.in_features} input features"
            )
        clip = float(transform.clip_ratio)
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"layer '{name}': activation clip ratio must be positive, got {clip}")
        self.transform = transform

    @abstractmethod
    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform (if any), clip and quantize 2-D activations per token: (values in this
        kernel's layout for :meth:`mm`, per-token scale)."""

    @abstractmethod
    def mm(
        self, x_q: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Quantized activations x int weights, dequantized to ``out_dtype``, plus bias."""

    def apply(self, layer, x, bias):
        x_q, x_scale = self.quantize_input(x)
        return self.mm(x_q, x_scale, bias, x.dtype)
