"""Layer sensitivity scan: which layers a scheme hurts most, measured one unit at a time.

A *unit* is what vLLM serves with one scheme: the q/k/v projections of a block (fused into
``qkv_proj``), ``o_proj``, gate/up (fused into ``gate_up_proj``), ``down_proj``; any other linear
layer is a unit of its own. ``granularity="block"`` scans whole decoder blocks instead.

For each unit the scan fake-quantizes that unit alone with the preset's own quantization args
(round to nearest, with compressed-tensors' ``calculate_qparams`` / ``fake_quantize``, so the grid is
the one llmcompressor writes) and measures, on calibration samples, against the unquantized model:
  kl   the mean KL(baseline || quantized) of next-token distributions over every position;
  mse  the relative MSE of the output of the decoder block that holds the unit, ||y_q - y||² / ||y||².
For GPTQ/AWQ/SmoothQuant presets round to nearest is a proxy: it ranks layers by how much the grid
itself costs them, before any error compensation.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}  # fmt: skip


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. model.layers.3.self_attn.qkv_proj
    layers: tuple[str, ...]  # the checkpoint's linear layers it holds
    block: int


@dataclass(frozen=True)
class QuantArgs:
    """The fake-quantization of one scheme: compressed-tensors args for weights and activations."""

    weights: object  # compressed_tensors QuantizationArgs
    activations: object | None  # dynamic per-token args, or None for weight-only

    def grid(self) -> tuple:
        """The args as plain data, to compare two scans' grids. pydantic's own equality also compares
        each model's class and private state, and in the full test suite two args with the same
        fields compared unequal."""
        return tuple(a if a is None else a.model_dump(mode="json") for a in (self.weights, self.activations))

    @staticmethod
    def from_group(group: dict) -> "QuantArgs":
        from compressed_tensors.quantization import QuantizationArgs

        # The scan rounds to nearest on min-max scales: GPTQ's column order and the observer do not
        # enter it. llmcompressor fills both in when it resolves a modifier's config, so whether they
        # show depends on what ran before; they are left out so that grids compare equal.
        unused = ("actorder", "observer", "observer_kwargs")
        weights = {k: v for k, v in group["weights"].items() if k not in unused}
        acts = group.get("input_activations")
        if acts is not None and not (acts.get("dynamic") and acts.get("strategy") == "token"):
            acts = {**acts, "strategy": "token", "dynamic": True}  # static scales need data: use per-token
        return QuantArgs(QuantizationArgs(**weights), QuantizationArgs(**acts) if acts else None)


# -------------------------------------------------------------------------- model structure


def decoder_blocks(model) -> torch.nn.ModuleList:
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder blocks found")


def quant_units(model, ignore: tuple[str, ...] = ("lm_head",), granularity: str = "unit") -> list[Unit]:
    """The units of ``model`` in forward order (fused shards together)."""
    if granularity not in ("unit", "block"):
        raise ValueError(f"granularity must be 'unit' or 'block', got {granularity!r}")
    blocks = decoder_blocks(model)
    block_of = {id(b): i for i, b in enumerate(blocks)}
    prefix_of = {}
    for name, module in model.named_modules():
        if id(module) in block_of:
            prefix_of[name] = block_of[id(module)]
    units: dict[str, list[str]] = {}
    block_index: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in ignore or name in ignore:
            continue
        owner = next((p for p in prefix_of if name.startswith(p + ".")), None)
        if owner is None:
            continue  # outside the decoder blocks (lm_head and the like stay as the recipe says)
        parent, _, leaf = name.rpartition(".")
        key = f"{owner}" if granularity == "block" else f"{parent}.{FUSED.get(leaf, leaf)}"
        units.setdefault(key, []).append(name)
        block_index[key] = prefix_of[owner]
    return [Unit(k, tuple(v), block_index[k]) for k, v in units.items()]


# -------------------------------------------------------------------------- fake quantization


def _fake_quant(x: torch.Tensor, args) -> torch.Tensor:
    """Round to nearest on ``args``' grid (weights per channel/group; activations per token)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = str(getattr(args.strategy, "value", args.strategy))
    x2 = x.reshape(-1, x.shape[-1]).float()
    if strategy == "group":
        g = args.group_size
        if x2.shape[1] % g:
            raise ValueError(f"group size {g} does not divide the input size {x2.shape[1]}")
        grouped = x2.reshape(x2.shape[0], -1, g)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    elif strategy in ("channel", "token"):
        lo, hi = x2.amin(-1, keepdim=True), x2.amax(-1, keepdim=True)
    elif strategy == "tensor":
        lo, hi = x2.amin().reshape(1), x2.amax().reshape(1)
    else:
        raise ValueError(f"sensitivity scan: unsupported strategy {strategy!r}")
    scale, zp = calculate_qparams(lo, hi, args)
    return fake_quantize(x2, scale, zp, args).to(x.dtype).reshape(x.shape)


def layer_args(units, kept: set[str], args: QuantArgs, fallback: QuantArgs | None) -> dict[str, QuantArgs]:
    """Each layer of ``units`` -> its grid: ``fallback`` for the units in ``kept`` (None: left
    unquantized), ``args`` for the others."""
    out = {}
    for u in units:
        chosen = fallback if u.name in kept else args
        if chosen is not None:
            out.update({name: chosen for name in u.layers})
    return out


@contextmanager
def fake_quantized(model, layer_args: dict[str, QuantArgs]) -> Iterator[None]:
    """Within the block, the named linear layers run fake-quantized; weights restored after."""
    modules = dict(model.named_modules())
    saved, hooks = {}, []
    try:
        for name, qa in layer_args.items():
            m = modules[name]
            saved[name] = m.weight.data
            m.weight.data = _fake_quant(m.weight.data, qa.weights)
            if qa.activations is not None:
                act = qa.activations
                hooks.append(
                    m.register_forward_pre_hook(lambda _m, inp, a=act: (_fake_quant(inp[0], a), *inp[1:]))
                )
        yield
    finally:
        for h in hooks:
            h.remove()
        for name, w in saved.items():
            modules[name].weight.data = w


# -------------------------------------------------------------------------- measurement


@dataclass
class Reference:
    """The unquantized model's outputs on the scan samples."""

    samples: list[torch.Tensor]  # input ids, [1, seq]
    logprobs: list[torch.Tensor]  # [seq - 1, vocab], float32
    nll: float  # mean negative log-likelihood of the actual next tokens
    block_outputs: list[list[torch.Tensor]] = field(default_factory=list)  # [sample][block]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@contextmanager
def _capture_blocks(model, store: list) -> Iterator[None]:
    hooks = [
        b.register_forward_hook(
            lambda _m, _i, out, i=i: store.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).detach()
            )
        )
        for i, b in enumerate(decoder_blocks(model))
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def reference(model, samples: list[list[int]], keep_blocks: bool = True) -> Reference:
    ids = [torch.tensor([s]) for s in samples]
    logprobs, blocks, nll, count = [], [], 0.0, 0
    n_blocks = len(decoder_blocks(model))
    for x in ids:
        store: list = [None] * n_blocks
        with _capture_blocks(model, store):
            logits = model(x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        nll -= lp.gather(1, x[0, 1:, None]).sum().item()
        count += x.shape[1] - 1
        logprobs.append(lp)
        blocks.append(store if keep_blocks else [])
    return Reference(ids, logprobs, nll / count, blocks)


@dataclass(frozen=True)
class Damage:
    kl: float
    ppl_change_pct: float
    mse: float | None = None


@torch.no_grad()
def measure(model, ref: Reference, block: int | None = None) -> Damage:
    """KL and perplexity change vs ``ref`` of the model as it is now; block MSE for ``block``."""
    kl_sum, nll, count, err, norm = 0.0, 0.0, 0, 0.0, 0.0
    n_blocks = len(decoder_blocks(model))
    for x, base_lp, base_blocks in zip(
        ref.samples, ref.logprobs, ref.block_outputs or [None] * len(ref.samples)
    ):
        store: list = [None] * n_blocks
        with _capture_blocks(model, store):
            logits = model(x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        kl_sum += (base_lp.exp() * (base_lp - lp)).sum().item()
        nll -= lp.gather(1, x[0, 1:, None]).sum().item()
        count += x.shape[1] - 1
        if block is not None and base_blocks:
            d = store[block].float() - base_blocks[block].float()
            err += d.pow(2).sum().item()
            norm += base_blocks[block].float().pow(2).sum().item()
    mse = err / norm if block is not None and norm > 0 else None
    return Damage(max(kl_sum / count, 0.0), 100 * (math.exp(nll / count) / ref.perplexity - 1), mse)


def _bar(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="unit", file=sys.stderr, disable=not show, leave=False)


def scan(model, ref: Reference, units: list[Unit], args: QuantArgs, progress: bool = True) -> list[dict]:
    """Damage of quantizing each unit alone, most damaging first."""
    rows = []
    bar = _bar(len(units), "sensitivity scan", progress)
    for unit in units:
        with fake_quantized(model, {name: args for name in unit.layers}):
            d = measure(model, ref, unit.block)
        rows.append({"unit": unit.name, "block": unit.block, "layers": list(unit.layers), "kl": d.kl,
                     "ppl_change_pct": d.ppl_change_pct, "mse": d.mse})  # fmt: skip
        bar.update(1)
    bar.close()
    rows.sort(key=lambda r: (-r["kl"], r["unit"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows
