"""FlatQuantModifier: learned Kronecker transforms and clipping, block by block (arXiv 2410.09426).

Lifecycle (llmcompressor's sequential pipeline, one decoder block per subgraph):

- on_initialize: find the decoder blocks and their transform groups; attach an identity
  ``flatquant-kronecker`` transform (compressed-tensors' ``apply_transform_config``) to the
  input of every linear in them, so the model is unchanged and the checkpoint carries
  ``transform_config`` and each layer's factors.
- on_calibration_start: capture each block's inputs (args and kwargs) as calibration runs, with
  quantization off (the QuantizationModifier calibrates in its own pass, after this one).
- on_sequential_epoch_end: for the block just calibrated, compute its full-precision outputs
  on the captured inputs, then train the transforms (AdamW, cosine schedule) to minimise the
  MSE between those and the outputs of the block with fake-quantized weights and activations;
  keep the best epoch; fold the inverse transforms into the weights in float64, the smoothing
  scales into the norms, clamp each weight row to its learned clipping range, and set the
  online transform's factors and activation clipping ratio. The pipeline then propagates the
  block's outputs (folded weights, online transforms and clipping, unquantized) to the next.
- on_calibration_end: remove hooks, turn quantization back on; every block must have been
  calibrated. The QuantizationModifier that follows observes the folded weights (their
  min-max range is the clipped one) and writes the int weights.

The weights are quantized round-to-nearest by that QuantizationModifier, as FlatQuant's
default; activations are quantized per token at run time.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Literal

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import disable_quantization, enable_quantization
from compressed_tensors.transform import apply_transform_config
from compressed_tensors.utils import update_offload_parameter
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.utils.pytorch import infer_sequential_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch.utils._pytree import tree_map

from vllm_ptq_ascend.formats.kronecker import (
    HEADS_GROUP,
    TRANSFORM_GROUP,
    check_factors,
    fold_into_value_rows,
    fold_into_weight,
    transform_config,
)
from vllm_ptq_ascend.recipes.families import V_PROJ, Family, resolve_family
from vllm_ptq_ascend.recipes.flatquant.structure import (
    LinearGroup,
    block_groups,
    divide_rows,
    fold_into_norm,
)
from vllm_ptq_ascend.recipes.flatquant.trainable import FlatQuantLinear, TrainableTransform

__all__ = ["FlatQuantModifier"]


class FlatQuantModifier(Modifier):
    """Learn FlatQuant transforms for W4A4 / W4A8 / W8A8 (put a QuantizationModifier after it).

    :param weight_bits: bits of the symmetric per-channel weights the following modifier writes
    :param act_bits: bits of the per-token dynamic activations served
    :param epochs: passes over the captured calibration inputs per block (paper: 15)
    :param lr: AdamW learning rate of the transforms and smoothing scales (paper: 5e-3)
    :param clip_lr: learning rate of the clipping ratios (paper: 5e-2)
    :param batch_size: captured calibration batches per optimizer step (paper: 4)
    :param smooth_alpha: SmoothQuant migration strength of the initial smoothing scale (paper: 0.3)
    :param learn_smooth: learn a per-channel smoothing scale where a norm can absorb it
    :param smooth_down_proj: also learn one for down_proj, folded into up_proj's output rows, as the
        reference does (``down_trans.diag_scale``); where the family's MLP is act(gate)·up
    :param weight_clip: learn per-output-channel weight clipping
    :param act_clip: learn a per-layer activation clipping ratio
    :param seed: seed of the batch order (and of random initial factors)
    :param init: initial Kronecker factors: "identity", "random-orthogonal" as the reference
        (ruikangliu/FlatQuant ``get_init_weight``) starts them (the presets' default: it measures better),
        or "hadamard": random-Hadamard factors (``trainable.random_hadamard``), whose Kronecker product
        is the full random-Hadamard rotation QuIP starts from; random-orthogonal for a factor size with no
        known Hadamard matrix
    :param parametrization: "direct" (the factor itself), or "svd-cayley": U·diag·Vᵀ with U, V kept
        orthogonal by a Cayley map, the reference's default (``SVDDecomposeTransMatrix``)
    :param tp: the largest tensor-parallel size the checkpoint is served at: the input transforms of
        row-parallel layers (o_proj, down_proj), whose input vLLM splits over the ranks, are learned with
        a left factor block-diagonal over ``tp`` ranks and activations quantized per rank slice, so each
        rank applies its own block (served at any tensor-parallel size dividing ``tp``)
    :param o_proj_transform: "kronecker" (o_proj's input factored as any other layer's), or
        "per-head" as the reference and msModelSlim do: L over the attention heads, online, and R within
        each head, folded into v_proj's weight rows (attention mixes each head's values linearly), so
        only the small L runs online; its left factor splits over tensor-parallel ranks by heads (the
        presets' default)
    :param w8a8_layers: full names of layers the recipe serves at W8A8 (mixed precision under a
        budget, ``recipes/mixed.py``): their weights and activations are fake-quantized to 8 bits while
        the transforms are learned
    :param family: the model family (``recipes/families.py``) whose block structure says which norm
        feeds which group; detected from the model's config if None
    """

    weight_bits: int = 4
    act_bits: int = 4
    requires_calibration_data: bool = True  # block inputs are needed: the sequential pipeline
    epochs: int = Field(default=15, ge=0)
    lr: float = Field(default=5e-3, gt=0)
    clip_lr: float = Field(default=5e-2, gt=0)
    batch_size: int = Field(default=4, ge=1)
    smooth_alpha: float = Field(default=0.3, ge=0, le=1)
    learn_smooth: bool = True
    smooth_down_proj: bool = False
    weight_clip: bool = True
    act_clip: bool = True
    seed: int = 0
    family: str | None = None
    init: Literal["identity", "random-orthogonal", "hadamard"] = "identity"
    parametrization: Literal["direct", "svd-cayley"] = "direct"
    tp: int = Field(default=1, ge=1)
    o_proj_transform: Literal["kronecker", "per-head"] = "kronecker"
    w8a8_layers: list[str] = Field(default_factory=list)

    _family: Family | None = PrivateAttr(default=None)
    _blocks: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _inputs: dict[str, list] = PrivateAttr(default_factory=dict)
    _calibrated: set[str] = PrivateAttr(default_factory=set)
    #: per block: loss before training, best loss, seconds (read by tests and the model card)
    history: dict[str, dict] = Field(default_factory=dict, exclude=True)

    @field_validator("weight_bits", "act_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (4, 8):
            raise ValueError(f"FlatQuant quantizes to 4 or 8 bits, got {v}")
        return v

    # -- lifecycle ---------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._family = resolve_family(model, self.family)
        targets = infer_sequential_targets(model, sequential_targets=kwargs.get("sequential_targets"))
        targets = [targets] if isinstance(targets, str) else list(targets)
        self._blocks = {name: m for name, m in model.named_modules() if type(m).__name__ in targets}
        if not self._blocks:
            raise ValueError(f"FlatQuant: no decoder blocks of type {targets} in {type(model).__name__}")
        layer_names, per_head, head_dims = [], [], set()
        for name, block in self._blocks.items():
            for group in self._groups(block, name):
                names = [f"{name}.{n}" for n in group.names]
                if group.head_dim:
                    per_head += names
                    head_dims.add(group.head_dim)
                else:
                    layer_names += names
                self._check_splittable(name, group)
        if len(head_dims) > 1:  # one transform_config group holds one head_dim
            raise ValueError(
                f"FlatQuant: per-head o_proj transforms need one head_dim, found {sorted(head_dims)}"
            )
        config = transform_config(layer_names, TRANSFORM_GROUP, per_head, next(iter(head_dims), None))
        apply_transform_config(model, config)
        for _, param in model.named_parameters():
            param.requires_grad_(False)
        return True

    def _groups(self, block: torch.nn.Module, name: str) -> list[LinearGroup]:
        return block_groups(
            block,
            name,
            self._family,
            per_head_o_proj=self.o_proj_transform == "per-head",
            smooth_down_proj=self.smooth_down_proj,
        )

    def _check_splittable(self, block_name: str, group: LinearGroup) -> None:
        n1 = group.factor_sizes[0]
        if group.row_parallel and n1 % self.tp:
            heads = ", over its attention heads" if group.head_dim else ""
            raise ValueError(
                f"FlatQuant: '{block_name}.{group.names[0]}' has {group.in_features} inputs, whose "
                f"transform's left factor ({n1} x {n1}{heads}) "
                f"cannot be split into tp={self.tp} diagonal blocks; "
                f"choose a tp dividing {n1}"
            )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        # llmcompressor runs the QuantizationModifier after this one, in its own pass: until then
        # its weight scales are unset, so blocks run (and propagate) unquantized, with the
        # learned transforms and clipping of the blocks done so far.
        state.model.apply(disable_quantization)
        for name, block in self._blocks.items():
            self.register_hook(block, self._capture(name), "forward_pre", with_kwargs=True)

    def _capture(self, name: str):
        def hook(module, args, kwargs):
            detach = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self._inputs.setdefault(name, []).append((tree_map(detach, args), tree_map(detach, kwargs)))

        return hook

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs):
        names = {id(m): n for n, m in self._blocks.items()}
        for module in modules:
            name = names.get(id(module))
            if name is not None and name not in self._calibrated:
                self._calibrate(name, module)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        state.model.apply(enable_quantization)
        missing = sorted(set(self._blocks) - self._calibrated)
        if missing:
            raise RuntimeError(
                f"FlatQuant: {len(missing)} decoder block(s) saw no calibration data "
                f"(first: {', '.join(missing[:3])})"
            )

    def on_finalize(self, state: State, **kwargs) -> bool:
        self._inputs.clear()
        return True

    # -- one block ---------------------------------------------------------------
    def _calibrate(self, name: str, block: torch.nn.Module) -> None:
        calls = self._inputs.pop(name, None)
        if not calls:
            raise RuntimeError(f"FlatQuant: no calibration inputs were captured for block '{name}'")
        start = time.perf_counter()
        groups = self._groups(block, name)
        dtype = next(block.parameters()).dtype
        with torch.no_grad():
            act_max = {id(g): torch.zeros(g.in_features) for g in groups}
            hooks = [
                g.linears[0].register_forward_pre_hook(self._record_max(act_max[id(g)]), prepend=True)
                for g in groups
            ]
            try:
                targets = [_output(block(*a, **k)).float() for a, k in calls]
            finally:
                for h in hooks:
                    h.remove()
        calls = [tree_map(_to_float32, c) for c in calls]
        # one stream per block, fixed by the seed and the block's name (order of calibration irrelevant)
        init_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

        transforms = [
            TrainableTransform(
                g.in_features,
                self.act_bits,
                self._smooth_init(g, act_max[id(g)]) if (self.learn_smooth and g.smoothable) else None,
                self.act_clip,
                init=self.init,
                parametrization=self.parametrization,
                generator=init_generator,
                rank_slices=self.tp if g.row_parallel else 1,
                head_dim=g.head_dim,
            )
            for g in groups
        ]
        # v_proj's output heads carry a per-head o_proj transform's right factor
        value_heads = next((t for g, t in zip(groups, transforms) if g.head_dim), None)
        eight_bit = set(self.w8a8_layers)

        def wrapper(rel: str, lin, t) -> FlatQuantLinear:
            w_bits, a_bits = (8, 8) if f"{name}.{rel}" in eight_bit else (self.weight_bits, self.act_bits)
            heads = value_heads if rel == V_PROJ else None
            return FlatQuantLinear(lin, t, w_bits, self.weight_clip, heads, act_bits=a_bits)

        wrappers = [
            [wrapper(rel, lin, t) for rel, lin in zip(g.names, g.linears)] for g, t in zip(groups, transforms)
        ]
        with _swapped(block, groups, wrappers), _float32(block), torch.enable_grad():
            best = self._train(block, calls, targets, transforms, wrappers)
        self._fold(groups, transforms, wrappers, best, dtype, name)
        self.history[name] = {**best["stats"], "seconds": round(time.perf_counter() - start, 2)}
        self._calibrated.add(name)
        logger.info(
            "FlatQuant {}: block MSE {:.3g} -> {:.3g} in {:.1f} s",
            name,
            best["stats"]["initial_mse"],
            best["stats"]["best_mse"],
            self.history[name]["seconds"],
        )

    @staticmethod
    def _record_max(acc: torch.Tensor):
        def hook(module, args):
            x = args[0].detach().float()
            acc.copy_(torch.maximum(acc, x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(acc.device)))

        return hook

    def _smooth_init(self, group: LinearGroup, act_max: torch.Tensor) -> torch.Tensor:
        """SmoothQuant's s_j = max|x_j|^α / max|W_j|^(1-α) over the group's weights."""
        w_max = torch.stack([lin.weight.detach().float().abs().amax(dim=0) for lin in group.linears]).amax(
            dim=0
        )
        a = self.smooth_alpha
        return (act_max.clamp(min=1e-5) ** a / w_max.clamp(min=1e-5) ** (1 - a)).clamp(min=1e-5)

    def _train(self, block, calls, targets, transforms, wrappers) -> dict:
        transform_params = [*(p for t in transforms for p in t.factor_parameters())]
        transform_params += [t.log_smooth for t in transforms if t.log_smooth is not None]
        clip_params = [t.clip_logit for t in transforms if t.clip_logit.requires_grad]
        clip_params += [w.clip_logit for ws in wrappers for w in ws if w.clip_logit.requires_grad]
        steps_per_epoch = math.ceil(len(calls) / self.batch_size)
        total = max(1, self.epochs * steps_per_epoch)
        optimizer = torch.optim.AdamW(
            [{"params": transform_params, "lr": self.lr}, {"params": clip_params, "lr": self.clip_lr}],
            weight_decay=0.0,
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        trainables = [*transforms, *(w for ws in wrappers for w in ws)]

        def loss_of(indices) -> torch.Tensor:
            losses = [
                F.mse_loss(_output(block(*calls[i][0], **calls[i][1])).float(), targets[i]) for i in indices
            ]
            return torch.stack(losses).mean()

        with torch.no_grad():
            initial = float(loss_of(range(len(calls))))
        initial_state = _snapshot(trainables)
        best = {"state": initial_state, "mse": initial, "epoch": 0}
        order = torch.Generator().manual_seed(self.seed)
        for epoch in range(1, self.epochs + 1):
            perm = torch.randperm(len(calls), generator=order).tolist()
            total_loss = 0.0
            for i in range(0, len(perm), self.batch_size):
                batch = perm[i : i + self.batch_size]
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += float(loss.detach()) * len(batch)
            epoch_mse = total_loss / len(calls)
            if math.isfinite(epoch_mse) and epoch_mse < best["mse"] and _invertible(transforms):
                best = {"state": _snapshot(trainables), "mse": epoch_mse, "epoch": epoch}
        _restore(trainables, best["state"])
        with torch.no_grad():
            final = float(loss_of(range(len(calls))))
        if not final <= initial:  # the epoch mean was measured while training: keep the start if worse
            _restore(trainables, initial_state)
            final, best["epoch"] = initial, 0
        best["stats"] = {
            "initial_mse": initial,
            "best_mse": final,
            "best_epoch": best["epoch"],
            "epochs": self.epochs,
        }
        return best

    def _fold(self, groups, transforms, wrappers, best, dtype, block_name) -> None:
        """Write the learned transform into the model: weights, norms, online transform modules."""
        with torch.no_grad():
            for group, t, ws in zip(groups, transforms, wrappers):
                left, right = t.left.detach().double(), t.right.detach().double()
                where = f"FlatQuant block '{block_name}' {group.names}"
                check_factors(left, right, group.in_features, where)
                smooth = t.smooth()
                smooth = None if smooth is None else smooth.detach().double()
                for lin, w in zip(group.linears, ws):
                    folded = fold_into_weight(w.w, left, right, smooth)
                    if w.value_heads is not None:  # v_proj: o_proj's per-head right factor, bias too
                        value_right = w.value_heads.right.detach().double()
                        b = None if w.b is None else w.b.double()
                        folded, bias = fold_into_value_rows(folded, b, value_right)
                        if bias is not None:
                            update_offload_parameter(lin, "bias", bias.to(lin.bias.dtype))
                    bound = folded.abs().amax(dim=1, keepdim=True) * w.clip_ratio().detach().double().reshape(
                        -1, 1
                    )
                    folded = torch.maximum(torch.minimum(folded, bound), -bound)
                    update_offload_parameter(lin, "weight", folded.to(dtype))
                    online = getattr(lin, f"{HEADS_GROUP if group.head_dim else TRANSFORM_GROUP}_input")
                    online.left.data = left.to(online.left.dtype)
                    # a per-head right factor runs in v_proj: online only L ⊗ I
                    online_right = torch.eye(right.shape[0], dtype=right.dtype) if group.head_dim else right
                    online.right.data = online_right.to(online.right.dtype)
                    online.clip_ratio.data = t.clip_ratio().detach().reshape(1).to(online.clip_ratio.dtype)
                if smooth is not None and group.norm is not None:  # w / s, or (1 + w) / s - 1 (Gemma)
                    update_offload_parameter(group.norm, "weight", fold_into_norm(group, smooth))
                up = group.smooth_rows_of
                if smooth is not None and up is not None:  # up_proj, already folded above: its rows / s
                    weight, bias = divide_rows(up.weight.double(), _double(up.bias), smooth)
                    update_offload_parameter(up, "weight", weight.to(up.weight.dtype))
                    if bias is not None:
                        update_offload_parameter(up, "bias", bias.to(up.bias.dtype))


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def _to_float32(x):
    return x.detach().float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _snapshot(modules) -> list[dict]:
    # recurse: a factor learned as U·diag·Vᵀ keeps its parameters in submodules
    return [{k: v.detach().clone() for k, v in m.named_parameters()} for m in modules]


def _restore(modules, states) -> None:
    with torch.no_grad():
        for m, state in zip(modules, states):
            for k, v in state.items():
                m.get_parameter(k).copy_(v)


def _invertible(transforms) -> bool:
    try:
        for t in transforms:
            for f in (t.left, t.right):
                if torch.linalg.cond(f.detach().double()).item() > 1e5:
                    return False
    except RuntimeError:
        return False
    return True


class _swapped:
    """Put the trainable wrappers in place of the block's linears, and the originals back after."""

    def __init__(self, block, groups, wrappers):
        self.items = [
            (block, name, lin, w)
            for g, ws in zip(groups, wrappers)
            for name, lin, w in zip(g.names, g.linears, ws)
        ]

    def __enter__(self):
        for block, name, _, w in self.items:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, w)

    def __exit__(self, *exc):
        for block, name, lin, _ in self.items:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, lin)


class _float32:
    """Run the block's own parameters (norms) in float32 while training; restore the dtype after."""

    def __init__(self, block):
        self.block = block
        self.dtypes = {n: p.dtype for n, p in block.named_parameters()}

    def __enter__(self):
        for p in self.block.parameters():
            if p.is_floating_point():
                p.data = p.data.float()

    def __exit__(self, *exc):
        for n, p in self.block.named_parameters():
            if n in self.dtypes:
                p.data = p.data.to(self.dtypes[n])
