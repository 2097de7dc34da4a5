"""Model families: the norm -> linears structure of a decoder block, and the folds it allows.

The upstream sources it follows and the layouts in detail: ``docs/sources.md``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.utils import match_modules_set
from llmcompressor.modeling.offset_norm import NormCalibrationModule
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier, SpinQuantModifier
from llmcompressor.modifiers.transform.awq.mappings import AWQMapping
from torch.utils._pytree import tree_leaves

Q_PROJ, K_PROJ, V_PROJ, O_PROJ = (f"self_attn.{p}_proj" for p in "qkvo")
GATE_PROJ, UP_PROJ, DOWN_PROJ = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
QKV, GATE_UP = (Q_PROJ, K_PROJ, V_PROJ), (GATE_PROJ, UP_PROJ)
LINEARS = (Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ)
BLOCK = re.compile(r"^(?P<block>(?:.*\.)?layers\.\d+)\.(?P<rel>.+)$")


class FamilyError(ValueError):
    """A model, a block or a fold that the family's structure does not allow (the message names it)."""


@dataclass(frozen=True)
class Family:
    """The structure of one family's decoder block (names relative to the block)."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    attn_norm: str = "input_layernorm"  # its output is read by q/k/v, and only by them
    mlp_norm: str = "post_attention_layernorm"  # read by gate/up, and only by them
    # norms on a branch's output before the residual add: no linear reads them, nothing folds into them
    output_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0  # 0: y = x̂·w; 1: y = x̂·(1 + w)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # self_attn.q_norm / k_norm on each head after the projections
    v_o_fold: bool = True
    up_down_fold: bool = True
    embed_scale: bool = False  # token embeddings are multiplied by sqrt(hidden_size)
    tied_embeddings: bool = False  # the family's default tie_word_embeddings
    attn_softcap: str | None = None  # config key of the attention-logit soft-cap
    final_softcap: str | None = None  # config key of the final-logit soft-cap
    notes: str = field(default="", compare=False)

    @property
    def norms(self) -> tuple[str, ...]:
        return (self.attn_norm, self.mlp_norm, *self.output_norms)

    def fold_sources(self) -> dict[str, tuple[str, ...]]:
        """What a scale may be folded into -> every linear that reads its output."""
        sources = {self.attn_norm: QKV, self.mlp_norm: GATE_UP}
        if self.v_o_fold:
            sources[V_PROJ] = (O_PROJ,)
        if self.up_down_fold:
            sources[UP_PROJ] = (DOWN_PROJ,)
        return sources

    def role(self, rel: str) -> str:
        """What module ``rel`` of a block is in this family, for error messages."""
        if rel in self.output_norms:
            return "normalises a branch's output before the residual add (no linear reads it)"
        sources = self.fold_sources()
        if rel in sources:
            return f"is read by {', '.join(sources[rel])}"
        if rel in LINEARS:
            return "is a linear whose output no fold of this family may scale"
        return "is not part of this family's block structure"

    def smoothquant_mappings(self) -> list[list]:
        """SmoothQuantModifier mappings: [[balance layers], smooth layer] per norm."""
        return [
            [[_pattern(n) for n in QKV], _pattern(self.attn_norm)],
            [[_pattern(n) for n in GATE_UP], _pattern(self.mlp_norm)],
        ]

    def awq_mappings(self) -> list:
        """AWQModifier mappings: every fold this family allows."""
        return [
            AWQMapping(_pattern(src), [_pattern(n) for n in readers])
            for src, readers in self.fold_sources().items()
        ]

    def for_config(self, config) -> Family:
        """The family's structure for one model's config (openPangu's sandwich-norm variant)."""
        if self.name == "openpangu_embedded" and _get(config, "sandwich_norm", False):
            return replace(
                self,
                mlp_norm="pre_mlp_layernorm",
                output_norms=("post_attention_layernorm", "post_mlp_layernorm"),
            )
        return self

    def facts(self, config) -> dict[str, Any]:
        """What a model of this family does around its blocks, read from its config."""
        hidden = _get(config, "hidden_size")
        return {
            "family": self.name,
            "embed_multiplier": float(hidden) ** 0.5 if self.embed_scale else 1.0,
            "tied_embeddings": bool(_get(config, "tie_word_embeddings", self.tied_embeddings)),
            "attn_softcap": _get(config, self.attn_softcap) if self.attn_softcap else None,
            "final_softcap": _get(config, self.final_softcap) if self.final_softcap else None,
            "norm": "x*(1+w)" if self.norm_offset else "x*w",
            "mlp_norm": self.mlp_norm,
        }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("LlamaForCausalLM",), ("llama",), notes="Llama, SmolLM2, DeepSeek-R1-Distill-Llama"),
        Family(
            "qwen2",
            ("Qwen2ForCausalLM",),
            ("qwen2",),
            qkv_bias=True,
            notes="Qwen2/2.5, DeepSeek-R1-Distill-Qwen, QwQ",
        ),
        Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norm=True),
        Family("mistral", ("MistralForCausalLM",), ("mistral",)),
        Family(
            "openpangu_embedded",
            ("PanguEmbeddedForCausalLM",),
            ("PanguEmbedded",),
            qkv_bias=True,
            o_bias=True,
            notes="not in transformers: Llama classes with bias=True (the checkpoint's remote code)",
        ),
        Family(
            "gemma2",
            ("Gemma2ForCausalLM",),
            ("gemma2",),
            mlp_norm="pre_feedforward_layernorm",
            output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
            norm_offset=1.0,
            embed_scale=True,
            tied_embeddings=True,
            attn_softcap="attn_logit_softcapping",
            final_softcap="final_logit_softcapping",
        ),
    )
}


def _pattern(rel: str) -> str:
    """A regex target matching module ``rel`` of every decoder block."""
    return "re:.*layers\\.\\d+\\." + re.escape(rel) + "$"


def _get(config, key: str, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _read_config(config) -> Any:
    if isinstance(config, (str, Path)):
        path = Path(config)
        return json.loads((path / "config.json" if path.is_dir() else path).read_text())
    return config


def family_of(config) -> Family:
    """The family of a model: a config (transformers' or a dict), or a model directory.

    ``architectures`` decides (it is what vLLM serves); ``model_type`` otherwise. An unknown model is
    an error: folding scales into a block whose structure is guessed is how a checkpoint is destroyed.
    """
    config = _read_config(config)
    archs = list(_get(config, "architectures") or [])
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam.for_config(config)
    model_type = str(_get(config, "model_type", "") or "")
    for fam in FAMILIES.values():
        if model_type.lower() in (t.lower() for t in fam.model_types):
            return fam.for_config(config)
    known = ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())
    raise FamilyError(
        f"model_type {model_type!r}, architectures {archs}: not a known model family, so its decoder "
        f"block's norm -> linear structure is unknown and no scale can be folded safely. Known: {known}. "
        "Use a preset that folds nothing (w8a8-dynamic, the GPTQ and RTN presets), or name the family "
        "(`family=` on the modifier) if the model is built like one of these"
    )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def resolve_family(model, name: str | None = None) -> Family:
    """The family of a loaded model (or the named one), with its blocks checked against it."""
    fam = family_of(model.config) if name is None else get_family(name).for_config(model.config)
    check_blocks(model, fam)
    return fam


# -- the model's blocks against the family -------------------------------------------------


def decoder_blocks(model) -> list[tuple[str, Any]]:
    """(name, module) of every decoder block: the ``layers.N`` modules."""
    blocks = [(n, m) for n, m in model.named_modules() if re.fullmatch(r"(?:.*\.)?layers\.\d+", n)]
    if not blocks:
        raise FamilyError(f"{type(model).__name__}: no decoder blocks (modules named 'layers.N') found")
    return blocks


def _is_norm(module) -> bool:
    w = getattr(module, "weight", None)
    return (
        isinstance(w, torch.Tensor)
        and w.dim() == 1
        and not isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        and not any(True for _ in module.children())
    )


def check_blocks(model, fam: Family) -> None:
    """Every block has the family's norms and linears, and no norm the family does not know of
    (a norm the table misses may be the one that really feeds the MLP)."""
    for name, block in decoder_blocks(model):
        where = f"decoder block '{name}' ({type(block).__name__})"
        for rel in fam.norms:
            module = _submodule(block, rel)
            if module is None or not _is_norm(module):
                raise FamilyError(
                    f"{where}: no norm '{rel}', which family {fam.name} expects ({fam.role(rel)})"
                )
        for rel in LINEARS:
            if not isinstance(_submodule(block, rel), torch.nn.Linear):
                raise FamilyError(f"{where}: no Linear '{rel}', which family {fam.name} expects")
        for child, module in block.named_children():
            if _is_norm(module) and child not in fam.norms:
                raise FamilyError(
                    f"{where}: norm '{child}' is not in family {fam.name}'s structure "
                    f"(norms {', '.join(fam.norms)}); which linears read it is unknown, so nothing is folded"
                )


def _submodule(block, rel: str):
    try:
        return block.get_submodule(rel)
    except AttributeError:
        return None


def split_block_name(name: str) -> tuple[str, str]:
    """'model.layers.3.mlp.up_proj' -> ('model.layers.3', 'mlp.up_proj')."""
    m = BLOCK.match(name)
    if m is None:
        raise FamilyError(f"layer '{name}' is not inside a decoder block (layers.N)")
    return m["block"], m["rel"]


# -- norms: how they are parametrised, and folding a scale into them ------------------------


def norm_offset(norm, name: str) -> float:
    """0.0 if ``norm`` computes x̂·w, 1.0 if x̂·(1 + w) (x̂ = x / rms(x)), measured on the module
    itself. Anything else (a LayerNorm, a norm with a bias) cannot take a per-channel scale: an error
    naming the layer. Only the module's forward is run (llmcompressor hooks off): inside ``oneshot``
    its parameters live in compressed-tensors' offload cache, where swapping them in and out
    would write through to the model."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    w = norm.weight.detach().double()
    # rows with mean(x²) = 1e4: any eps a norm adds (1e-5, 1e-6) is below float32 precision
    x = 100.0 * torch.randn(8, w.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), HooksMixin.disable_hooks():
        y = norm(x.to(norm.weight.dtype) if norm.weight.dtype == torch.float64 else x).double()
    xhat = x.double() / x.double().pow(2).mean(-1, keepdim=True).sqrt()
    per_channel = (y * xhat).sum(0) / (xhat * xhat).sum(0) - w  # the offset, channel by channel
    offset = round(float(per_channel.mean()))
    fits = (y - xhat * (offset + w)).abs().max() <= 1e-4 * y.abs().max()
    if offset not in (0, 1) or not fits:
        raise FamilyError(
            f"norm '{name}' ({type(norm).__name__}) computes neither x̂·w nor x̂·(1 + w) of its weight "
            "(x̂ = x / rms(x)), so a per-channel scale cannot be folded into it"
        )
    return float(offset)


def _form(offset: float) -> str:
    return "x̂·(1 + w)" if offset else "x̂·w"


def fold_scale_into_norm(weight, scale, offset: float):
    """The norm weight (float64) whose effective scale (offset + w) is divided by ``scale``."""
    return (offset + weight.detach().double()) / scale.double() - offset


def effective_offset(norm, name: str, fam: Family) -> float:
    """The offset of ``norm``'s parametrisation as it stands, checked against the family's.

    Inside ``oneshot``, llmcompressor 0.14 swaps each (1 + w) norm whose class it knows (Gemma's,
    Qwen3-Next's; ``modeling/offset_norm.py``) for a ``NormCalibrationModule`` holding w' = 1 + w and
    computing x̂·w', and writes w' - 1 back into the original when calibration ends: the norms a
    modifier sees there compute x̂·w', and dividing w' by s is the right fold. A (1 + w) norm that is
    not swapped, or a norm that computes what its family's do not, is an error naming the layer."""
    offset = norm_offset(norm, name)
    swapped = isinstance(norm, NormCalibrationModule)
    if offset == fam.norm_offset and not swapped:
        return offset
    if offset == 0 and swapped and fam.norm_offset == 1:
        return offset
    raise FamilyError(
        f"norm '{name}' ({type(norm).__name__}) computes {_form(offset)}"
        + (" (llmcompressor's stand-in for a (1 + w) norm)" if swapped else "")
        + f", but family {fam.name}'s norms compute {_form(fam.norm_offset)}; "
        "a scale folded into it would not be the one its readers are balanced for"
    )


def check_folds(model, fam: Family, pairs, what: str) -> None:
    """Refuse every (smooth layer, balance layers) pair of a SmoothQuant/AWQ mapping that the family
    does not allow, and every norm among the smooth layers that llmcompressor's fold (w / s) would
    get wrong: a norm that computes x̂·(1 + w) when the modifier runs."""
    sources = fam.fold_sources()
    for smooth_name, smooth, balance_names in pairs:
        block, rel = split_block_name(smooth_name)
        readers = []
        for b in balance_names:
            b_block, b_rel = split_block_name(b)
            if b_block != block:
                raise FamilyError(f"{what}: a mapping folds '{smooth_name}' into '{b}', another block")
            readers.append(b_rel)
        if rel not in sources:
            raise FamilyError(
                f"{what}: a mapping folds a scale into '{smooth_name}' against {balance_names}, but in "
                f"{fam.name} blocks '{rel}' {fam.role(rel)}; the model would change"
            )
        if sorted(readers) != sorted(sources[rel]):
            raise FamilyError(
                f"{what}: a mapping folds a scale into '{smooth_name}' against {readers}, but in "
                f"{fam.name} blocks its output is read by {list(sources[rel])}; every reader must be "
                "balanced"
            )
        if rel in fam.norms and effective_offset(smooth, smooth_name, fam) != 0:
            raise FamilyError(
                f"{what}: norm '{smooth_name}' ({type(smooth).__name__}) computes x̂·(1 + w) and "
                "llmcompressor has not swapped it for its x̂·w' stand-in (its class is not in "
                "llmcompressor's NormCalibrationModule registry, or the modifier runs outside oneshot): "
                "llmcompressor would write w / s where (1 + w) / s - 1 is meant"
            )


def _names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def smoothquant_pairs(model, mappings) -> list[tuple[str, Any, list[str]]]:
    """The (smooth layer, balance layers) llmcompressor's SmoothQuant resolves ``mappings`` to."""
    names, pairs = _names(model), []
    for mapping in mappings:
        for *balance, smooth in match_modules_set(model, tree_leaves(mapping)):
            for s in smooth:
                pairs.append((names[id(s)], s, [names[id(b)] for b in tree_leaves(balance)]))
    return pairs


def awq_pairs(model, mappings) -> list[tuple[str, Any, list[str]]]:
    """The (smooth layer, balance layers) llmcompressor's AWQ resolves ``mappings`` to."""
    names, pairs = _names(model), []
    for mapping in mappings:
        for smooth, *balance in match_modules_set(model, (mapping.smooth_layer, *mapping.balance_layers)):
            for s in smooth:
                pairs.append((names[id(s)], s, [names[id(b)] for b in tree_leaves(balance)]))
    return pairs


# -- llmcompressor modifiers that fold by family -----------------------------------------------


class FamilySmoothQuantModifier(SmoothQuantModifier):
    """llmcompressor's SmoothQuantModifier given the model family's mappings, which are checked
    (this module's docstring). ``family``: a name from ``FAMILIES``; detected from the model if None."""

    family: str | None = None

    def on_initialize(self, state, **kwargs) -> bool:
        fam = resolve_family(state.model, self.family)
        if self.mappings is None:
            self.mappings = fam.smoothquant_mappings()
        check_folds(state.model, fam, smoothquant_pairs(state.model, self.mappings), "SmoothQuant")
        return super().on_initialize(state, **kwargs)


class FamilyAWQModifier(AWQModifier):
    """llmcompressor's AWQModifier given the model family's mappings, which are checked (this
    module's docstring). ``family``: a name from ``FAMILIES``; detected from the model if None."""

    family: str | None = None

    def on_initialize(self, state, **kwargs) -> bool:
        fam = resolve_family(state.model, self.family)
        if self.mappings is None:
            self.mappings = fam.awq_mappings()
        check_folds(state.model, fam, awq_pairs(state.model, self.mappings), "AWQ")
        return super().on_initialize(state, **kwargs)


def check_rotatable(fam: Family) -> None:
    """SpinQuant's R1 rotates the residual stream after fusing every norm into the linears that read
    it (llmcompressor's fixed norm mappings: input_layernorm -> q/k/v, post_attention_layernorm ->
    gate/up, model.norm -> lm_head). That is exact only for x̂·w norms that only linears read."""
    problems = []
    if fam.norm_offset:
        problems.append(
            "its norms compute x̂·(1 + w), which fusing the weight into the linears (w -> 1) breaks"
        )
    if fam.output_norms:
        problems.append(
            f"{', '.join(fam.output_norms)} normalise a branch's output before the residual add, so the "
            "rotated residual stream would pass through an elementwise weight no linear can absorb"
        )
    if (fam.attn_norm, fam.mlp_norm) != ("input_layernorm", "post_attention_layernorm"):
        problems.append(
            f"q/k/v read {fam.attn_norm} and gate/up read {fam.mlp_norm}, not llmcompressor's mapping"
        )
    if problems:
        raise FamilyError(
            f"SpinQuant rotations cannot be folded into family {fam.name}: " + "; ".join(problems)
        )


class FamilySpinQuantModifier(SpinQuantModifier):
    """llmcompressor's SpinQuantModifier (R1 + R2 folded into the weights, nothing online), on families
    whose block its fixed norm mappings fit (``check_rotatable``); others are refused by name.
    ``family``: a name from ``FAMILIES``; detected from the model if None."""

    family: str | None = None

    def on_initialize(self, state, **kwargs) -> bool:
        check_rotatable(resolve_family(state.model, self.family))
        return super().on_initialize(state, **kwargs)

    def _center_embeddings(self, model) -> None:
        """Not done. llmcompressor subtracts each embedding's mean, which QuaRot needs to turn a
        LayerNorm into an RMSNorm; every family here already normalises by RMS, which the mean
        enters, so centering changes the model (29% of the logits' range on the tiny random Llama,
        4e-7 without it: tests/recipes/test_model_families.py)."""


# YAML recipes name modifiers by class: register ours with llmcompressor's factory on import.
for _cls in (FamilySmoothQuantModifier, FamilyAWQModifier, FamilySpinQuantModifier):
    ModifierFactory.register(_cls.__name__, _cls)
