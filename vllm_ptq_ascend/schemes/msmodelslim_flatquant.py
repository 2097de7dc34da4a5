"""msModelSlim FlatQuant dense linear layers -> FlatQuantScheme (schemes/flatquant.py).

The upstream sources it follows and the layouts in detail: ``docs/sources.md``.
"""

from __future__ import annotations

import math

import torch

from vllm_ptq_ascend.formats.kronecker import check_factors, factor_sizes
from vllm_ptq_ascend.formats.msmodelslim import PACKED_VERSION
from vllm_ptq_ascend.formats.plan import MODELSLIM_FORMAT
from vllm_ptq_ascend.schemes import int_weights
from vllm_ptq_ascend.schemes.base import LayerShape
from vllm_ptq_ascend.schemes.flatquant import FlatQuantScheme
from vllm_ptq_ascend.schemes.msmodelslim_common import drop, loaded
from vllm_ptq_ascend.schemes.msmodelslim_w4a8 import ModelSlimW4A8Dynamic
from vllm_ptq_ascend.schemes.msmodelslim_w8a8 import ModelSlimW8A8Dynamic
from vllm_ptq_ascend.validation import (
    FLOAT_DTYPES,
    CheckpointError,
    TensorSpec,
    require_loaded,
    same_on_every_shard,
)

# label -> (weight bits, activation bits)
BITS = {
    "W4A4_FLATQUANT_DYNAMIC": (4, 4),
    "W8A8_FLATQUANT_DYNAMIC": (8, 8),
    "W4A8_FLATQUANT_DYNAMIC": (4, 8),
}
LABELS = tuple(BITS)
SHARD_INDEX = {"q": 0, "k": 1, "v": 2}  # vLLM's qkv shard ids; gate/up are 0, 1
GROUP = "flatquant"  # FlatQuantScheme's transform submodule: "flatquant_input"


def modelslim_factor_sizes(n: int) -> tuple[int, int]:
    """msModelSlim's (and vLLM-Ascend's) ``get_decompose_dim``: n = (a - b)(a + b) with the smallest a,
    i.e. the factor pair of equal parity nearest to √n. There is none for n ≡ 2 (mod 4), where their
    loop never ends (so no checkpoint exists): our nearest pair is used then."""
    for n1 in range(math.isqrt(n), 0, -1):
        if n % n1 == 0 and (n // n1 - n1) % 2 == 0:
            return n1, n // n1
    return factor_sizes(n)


def _holder(left: torch.Tensor, right: torch.Tensor, clip: float) -> torch.nn.Module:
    """FlatQuantScheme's ``<group>_input`` submodule."""
    holder = torch.nn.Module()
    for name, t in (
        ("left", left),
        ("right", right),
        ("clip_ratio", torch.tensor([clip], dtype=torch.float32)),
    ):
        holder.register_parameter(name, torch.nn.Parameter(t.float(), requires_grad=False))
    return holder


class _FlatQuant:
    """Mixin over an msModelSlim int scheme (its weight tensors and checks) adding the transform."""

    label = ""
    weight_bits = act_bits = 0

    def _setup(self, label: str) -> None:
        self.label = label
        self.weight_bits, self.act_bits = BITS[label]
        self.tensor_names = (*self.tensor_names, "left_trans", "clip_ratio")

    def describe(self) -> str:
        if self.inner is not None:
            return f"msModelSlim {self.label} -> {self.inner.describe()}"
        return (
            f"msModelSlim {self.label} (FlatQuant: online left_trans ⊗ right_trans, clip_ratio per shard; "
            f"int{self.weight_bits} symmetric per-channel weights, int{self.act_bits} dynamic per-token "
            "activations)"
        )

    def checkpoint_tensors(self, out_features, in_features):
        return super().checkpoint_tensors(out_features, in_features) | {
            "left_trans": TensorSpec(FLOAT_DTYPES),  # any square size (o_proj: the head count)
            "right_trans": TensorSpec(FLOAT_DTYPES, required=False),  # none for o_proj
            "clip_ratio": TensorSpec(FLOAT_DTYPES, ((1,), ())),
        }

    def create_weights(self, layer, shape: LayerShape, weight_loader):
        super().create_weights(layer, shape, weight_loader)
        # the sizes vLLM-Ascend registers; the whole layer's, which every rank loads (a row-parallel rank
        # keeps its diagonal block of left_trans: FlatQuantScheme)
        n1, n2 = modelslim_factor_sizes(shape.input_size)
        for name, dims in (("left_trans", (n1, n1)), ("right_trans", (n2, n2))):
            param = torch.nn.Parameter(torch.zeros(dims, dtype=torch.float32), requires_grad=False)
            param.weight_loader = self.loader(self._shared(name), name, FLOAT_DTYPES)
            layer.register_parameter(name, param)
        clip = torch.nn.Parameter(
            torch.zeros(len(shape.output_partition_sizes), dtype=torch.float32), requires_grad=False
        )
        clip.weight_loader = self.loader(self._per_shard_clip, "clip_ratio", FLOAT_DTYPES)
        layer.register_parameter("clip_ratio", clip)

    def _shared(self, name: str):
        """Load a factor whole (any shape: checked after loading); fused shards must agree."""

        return same_on_every_shard(self.where(name), name, lambda t: t.to(torch.float32))

    def _per_shard_clip(self, param, loaded_weight, shard_id=None):
        value = loaded_weight.detach().to(torch.float32).reshape(-1)
        if value.numel() != 1:
            raise CheckpointError(
                f"{self.where('clip_ratio')}: must hold one value, got shape {tuple(loaded_weight.shape)}"
            )
        index = 0 if shard_id is None else SHARD_INDEX.get(shard_id, shard_id)
        param.data[int(index)] = value[0]

    def _factors(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer's factors (a row-parallel rank's block is cut by FlatQuantScheme)."""
        in_f = self.shape.input_size
        left = layer.left_trans.data.float()
        if loaded(layer, "right_trans"):
            require_loaded(layer, self.layer_name, ("right_trans",), self.files, self.shards)
            right = layer.right_trans.data.float()
        else:  # o_proj: msModelSlim folds the right factor into v_proj's output
            n1 = left.shape[0] if left.dim() == 2 and left.shape[0] == left.shape[1] else 0
            if not n1 or in_f % n1:
                raise CheckpointError(
                    f"{self.where('left_trans')}: shape {tuple(left.shape)} does not fit the layer's {in_f} "
                    "inputs (a square factor dividing them; without right_trans the right factor is the "
                    "identity)"
                )
            right = torch.eye(in_f // n1, dtype=torch.float32)
        try:
            check_factors(left, right, in_f, self.where("left_trans/right_trans"))
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        return left, right

    def _clip_ratios(self, layer) -> list[float]:
        clips = layer.clip_ratio.data.reshape(-1).tolist()
        names = self.shards if len(clips) == len(self.shards) else [self.layer_name] * len(clips)
        for shard, c in zip(names, clips):
            if not (math.isfinite(c) and 0 < c <= 1):
                raise CheckpointError(
                    f"{self.where('clip_ratio')}{f' (shard {shard})' if len(clips) > 1 else ''}: must be "
                    f"in (0, 1] (msModelSlim stores the sigmoid of its learned clip factor), got {c}"
                )
        return clips

    def translate(self, layer):
        # the int scheme's checks and layout: weight int8 [out, in], weight_scale [out, 1], zero offsets
        super().translate(layer)
        left, right = self._factors(layer)
        clips = self._clip_ratios(layer)
        drop(layer, "left_trans", "right_trans", "clip_ratio")
        layer.add_module(f"{GROUP}_input", _holder(left, right, clips[0]))
        whole = self._flatquant(self.shards, (left.shape[0], right.shape[0]))
        widths = list(layer.logical_widths)
        if len(set(clips)) == 1 or len(clips) != len(widths):
            return whole
        runs: list[tuple[float, list[int], list[str]]] = []  # consecutive shards with one clip ratio
        for i, (c, w) in enumerate(zip(clips, widths)):
            if runs and runs[-1][0] == c:
                runs[-1][1].append(w)
                runs[-1][2].append(self.shards[i])
            else:
                runs.append((c, [w], [self.shards[i]]))
        return _ClipBlocks(self, whole, runs)

    def _flatquant(self, shards: list[str], kronecker: tuple[int, int]) -> FlatQuantScheme:
        """The scheme serving the translated layer (msModelSlim's factor sizes: o_proj's left one is
        the head count)."""
        return FlatQuantScheme(
            self.layer_name,
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            packed=False,
            transform_group=GROUP,
            kronecker=kronecker,
            left_name="left_trans",
            files=self.files,
            shards=shards,
        )


class ModelSlimFlatQuant(_FlatQuant, ModelSlimW8A8Dynamic):
    """W4A4_FLATQUANT_DYNAMIC / W8A8_FLATQUANT_DYNAMIC: W8A8_DYNAMIC's tensors (int4 values in int8
    for W4A4) plus the transform."""

    serves = (
        (MODELSLIM_FORMAT, "W4A4_FLATQUANT_DYNAMIC"),
        (MODELSLIM_FORMAT, "W8A8_FLATQUANT_DYNAMIC"),
    )

    def __init__(self, layer_name: str, *, label: str, files=None, shards=None):
        super().__init__(layer_name, files, shards)
        self._setup(label)


class ModelSlimFlatQuantW4A8(_FlatQuant, ModelSlimW4A8Dynamic):
    """W4A8_FLATQUANT_DYNAMIC: W4A8_DYNAMIC's per-channel "1.0.0" tensors plus the transform."""

    serves = ((MODELSLIM_FORMAT, "W4A8_FLATQUANT_DYNAMIC"),)

    def __init__(self, layer_name: str, *, version: str, files=None, shards=None, row_parallel=None):
        if version != PACKED_VERSION:
            raise CheckpointError(
                f"quant_model_description.json: layer '{layer_name}' has label 'W4A8_FLATQUANT_DYNAMIC' "
                f"with description version {version!r}; only msModelSlim's ascendV1 layout (version "
                f"'{PACKED_VERSION}': int4 pairs packed along the output dim, scale_bias) is served"
            )
        super().__init__(
            layer_name, group_size=0, version=version, files=files, shards=shards, row_parallel=row_parallel
        )
        self._setup("W4A8_FLATQUANT_DYNAMIC")

    def packed_dim(self) -> int:
        """The weight holds int4 pairs along the output dim (for ``inspect``'s layer sizes)."""
        return 0


class _ClipBlocks:
    """A fused layer whose shards have different clip ratios: one FlatQuantScheme (and kernel) per
    run of shards with one ratio, on its rows of the weight, outputs concatenated."""

    def __init__(self, outer: _FlatQuant, whole: FlatQuantScheme, runs):
        self.outer, self.whole, self.runs = outer, whole, runs
        self.blocks: list[tuple[torch.nn.Module, FlatQuantScheme, int, int]] = []

    def describe(self) -> str:
        ratios = ", ".join(
            f"{'/'.join(s.rsplit('.', 1)[-1] for s in shards)}: {c:.4g}" for c, _, shards in self.runs
        )
        return f"{self.whole.describe()}; clip ratio per shard ({ratios})"

    def validate_loaded(self, layer):
        self.whole.choose_kernel(self.outer.shape)  # the layer's geometry, which its checks read
        self.whole.validate_loaded(layer)  # weight range, scales, factors (clip ratios: translate)

    def prepare(self, layer):
        holder = getattr(layer, f"{GROUP}_input")
        delattr(layer, f"{GROUP}_input")
        w, s = layer.weight.data, layer.weight_scale.data
        in_f = layer.input_size_per_partition
        start = 0
        for clip, widths, shards in self.runs:
            end = start + sum(widths)
            sub = torch.nn.Module()
            shape = LayerShape(in_f, end - start, in_f, tuple(widths), layer.params_dtype)
            int_weights.setup_layer(sub, shape)
            sub.register_parameter(
                "weight", torch.nn.Parameter(w[start:end].contiguous(), requires_grad=False)
            )
            sub.register_parameter(
                "weight_scale", torch.nn.Parameter(s[start:end].contiguous(), requires_grad=False)
            )
            sub.add_module(f"{GROUP}_input", _holder(holder.left.data, holder.right.data, clip))
            scheme = self.outer._flatquant(shards, (holder.left.shape[0], holder.right.shape[0]))
            scheme.choose_kernel(shape)
            scheme.prepare(sub)
            self.blocks.append((sub, scheme, start, end))
            start = end
        drop(layer, "weight", "weight_scale")

    def apply_weights(self, layer, x, bias=None):
        outs = [
            scheme.apply_weights(sub, x, None if bias is None else bias[start:end])
            for sub, scheme, start, end in self.blocks
        ]
        return torch.cat(outs, dim=-1)
