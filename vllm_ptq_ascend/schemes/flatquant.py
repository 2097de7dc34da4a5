"""FlatQuant: an online Kronecker transform and clipping, then dynamic int activations.

Per token: x -> x·(L ⊗ R) (L [n1, n1], R [n2, n2]), clipped to ``clip_ratio`` of its max,
quantized per token to ``act_bits`` (4 or 8) and multiplied by symmetric per-channel int
weights of ``weight_bits`` (4 or 8) that already hold the folded inverse transform (see
``kronecker.py``). The transform's tensors come from the checkpoint's ``<group>_input``
submodule of each layer (compressed-tensors ``transform_config``); the shards of a fused
layer (q/k/v, gate/up) read one input, so their transforms must be identical.

Under tensor parallelism a row-parallel rank (o_proj, down_proj) holds one slice of the input
rows of X: it applies its diagonal block of L with all of R, which is exact only if L is
block-diagonal over the ranks (``FlatQuantModifier(tp=N)`` learns it so; anything else is refused
at load), and it quantizes its slice per token, as vLLM's row-parallel W8A8 layers do.
"""

from __future__ import annotations

import torch

from vllm_ptq_ascend.formats.kronecker import (
    TRANSFORM_TENSORS,
    check_factors,
    diagonal_block,
    layer_factor_sizes,
)
from vllm_ptq_ascend.formats.plan import CT_FORMAT
from vllm_ptq_ascend.kernels import IntDynamicSpec, OnlineKronecker
from vllm_ptq_ascend.schemes.base import SCALE_DTYPES, LayerShape, PtqScheme
from vllm_ptq_ascend.schemes.int_weights import IntWeightTensors
from vllm_ptq_ascend.validation import CheckpointError, TensorSpec, checked_loader, same_on_every_shard


def require_splittable(where: str, left_size: int, shape: LayerShape) -> None:
    """A row-parallel rank applies its own diagonal block of the left factor: it must split evenly."""
    if left_size % shape.input_shards:
        raise CheckpointError(
            f"{where}: the transform's left factor ({left_size} x {left_size}) cannot be split over "
            f"{shape.input_shards} tensor-parallel ranks of this row-parallel layer; serve this checkpoint "
            f"with a tensor_parallel_size dividing {left_size}"
        )


class FlatQuantScheme(PtqScheme):
    serves = ((CT_FORMAT, "FlatQuant"),)

    def __init__(
        self,
        layer_name: str,
        *,
        weight_bits: int,
        act_bits: int,
        packed: bool,
        transform_group: str = "flatquant",
        kronecker: tuple[int, int] | None = None,
        head_dim: int | None = None,
        left_name: str | None = None,
        files=None,
        shards=None,
    ):
        super().__init__(layer_name, files, shards)
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.weights = IntWeightTensors(weight_bits, packed)
        self.kronecker = kronecker  # the factor sizes, where they are not ours (factor_sizes)
        self.head_dim = head_dim  # a per-head transform (o_proj): factors of n / head_dim and head_dim
        self.transform_module = f"{transform_group}_input"
        # the checkpoint's name for the left factor, which errors name (msModelSlim: left_trans)
        self.left_name = left_name or f"{self.transform_module}.left"
        self.tensor_names = self.weights.tensor_names + tuple(
            f"{self.transform_module}.{t}" for t in TRANSFORM_TENSORS
        )

    def describe(self) -> str:
        return (
            f"FlatQuant W{self.weight_bits}A{self.act_bits} (online Kronecker transform + clipping; "
            f"{self.weights.describe()}; int{self.act_bits} dynamic per-token activations)"
        )

    def factor_sizes(self, in_features: int) -> tuple[int, int]:
        try:
            return self.kronecker or layer_factor_sizes(in_features, self.head_dim)
        except ValueError as e:
            raise CheckpointError(f"{self.where(self.left_name)}: {e}") from e

    def kernel_spec(self, shape):
        n1, n2 = self.factor_sizes(shape.input_size)
        # a row-parallel rank transforms its slice of the input with its diagonal block of the left factor
        return IntDynamicSpec(self.weight_bits, self.act_bits, (n1 // shape.input_shards, n2))

    def checkpoint_tensors(self, out_features, in_features):
        n1, n2 = self.factor_sizes(in_features)
        prefix = self.transform_module
        return self.weights.checkpoint_tensors(self, out_features, in_features) | {
            f"{prefix}.left": TensorSpec(SCALE_DTYPES, ((n1, n1),)),
            f"{prefix}.right": TensorSpec(SCALE_DTYPES, ((n2, n2),)),
            f"{prefix}.clip_ratio": TensorSpec(SCALE_DTYPES, ((1,), ())),
        }

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        n1, n2 = self.factor_sizes(shape.input_size)
        require_splittable(self.where(self.left_name), n1, shape)
        self.weights.register(layer, self, shape, weight_loader)
        holder = torch.nn.Module()
        for name, dims in (("left", (n1, n1)), ("right", (n2, n2)), ("clip_ratio", (1,))):
            param = torch.nn.Parameter(torch.empty(dims, dtype=torch.float32), requires_grad=False)
            param.weight_loader = checked_loader(
                self._same_for_every_shard(name),
                layer_name=self.layer_name,
                tensor=f"{self.transform_module}.{name}",
                dtypes=SCALE_DTYPES,
                files=self.files,
                shards=self.shards,
            )
            holder.register_parameter(name, param)
        layer.add_module(self.transform_module, holder)
        self.choose_kernel(shape)

    def _same_for_every_shard(self, name: str):
        """Load a transform tensor (any square size; checked after loading); fused shards must agree."""

        def as_float32(t):
            return t.to(torch.float32).reshape(-1 if name == "clip_ratio" else t.shape)

        return same_on_every_shard(self.where(f"{self.transform_module}.{name}"), name, as_float32)

    def validate_loaded(self, layer):
        self.weights.validate(self, layer)
        holder = getattr(layer, self.transform_module)
        shape = self.kernel.config.shape
        try:  # the whole transform, as every rank loads it; then this rank's block of it
            check_factors(
                holder.left.data,
                holder.right.data,
                shape.input_size,
                self.where(f"{self.transform_module}.left/right"),
            )
            self._rank_left(holder.left.data)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        clip = holder.clip_ratio.data
        if clip.numel() != 1 or not (0 < float(clip.reshape(-1)[0]) <= 1):
            raise CheckpointError(
                f"{self.where(self.transform_module + '.clip_ratio')}: must be one value in (0, 1], "
                f"got {clip.reshape(-1).tolist()[:4]}"
            )

    def _rank_left(self, left: torch.Tensor) -> torch.Tensor:
        """This rank's diagonal block of the left factor (all of it without row parallelism)."""
        shape = self.kernel.config.shape
        where = self.where(self.left_name)
        return diagonal_block(left, shape.input_shard, shape.input_shards, where)

    def prepare(self, layer):
        holder = getattr(layer, self.transform_module)
        clip = float(holder.clip_ratio.data.reshape(-1)[0])
        transform = OnlineKronecker(self._rank_left(holder.left.data).contiguous(), holder.right.data, clip)
        delattr(layer, self.transform_module)
        self.kernel.set_transform(transform)
        super().prepare(layer)
