"""`vllm-ptq-ascend inspect DIR`: check a checkpoint against its quantization config, without vLLM.

Reads the compressed-tensors ``quantization_config`` of ``config.json`` (or msModelSlim's
``quant_model_description.json``) and the safetensors headers, and loads a tensor only
where its values are checked (scales). Everything the plugin decides is decided by the
plugin's own code: :class:`~vllm_ptq_ascend.serving.config.PtqAscendConfig` plans the config
groups (:func:`~vllm_ptq_ascend.formats.compressed_tensors.plan_groups`) and maps layers to schemes
(``scheme_for``: vLLM's target/ignore matching, fused-shard agreement, msModelSlim
labels); each scheme's ``checkpoint_tensors`` says which tensors, dtypes and shapes a
layer needs (the same constants and ``group_layout`` its ``create_weights`` uses); scale
values go through :func:`~vllm_ptq_ascend.validation.require_positive_finite`.

What a layer is, without the model: a tensor prefix with a 2-D ``weight`` or a tensor
only quantized linear layers have (``weight_packed``, ``weight_scale``, ...), except
embeddings. Checkpoint shards that vLLM fuses
(``q/k/v_proj`` -> ``qkv_proj``, ``gate/up_proj`` -> ``gate_up_proj``; the mapping of
Llama-like models) are inspected as one layer, as vLLM builds them. Class-name targets
(``Linear``) are matched against the vLLM class such a layer would have: a fused layer
``QKVParallelLinear`` / ``MergedColumnParallelLinear``, ``o_proj``/``down_proj``
``RowParallelLinear``, ``lm_head`` ``ParallelLMHead`` (not a linear layer in vLLM, so
never quantized, as in the plugin), any other ``ColumnParallelLinear``; so ``Linear``
matches every linear layer, as it does in vLLM.

Not checked here (the plugin checks them at load): integer weight values in range, the
msModelSlim W8A8 ``deq_scale``/``quant_bias`` consistency, act-order ``g_idx`` bounds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_ptq_ascend import QUANT_METHOD
from vllm_ptq_ascend.formats.kronecker import HEADS_GROUP, TRANSFORM_GROUP
from vllm_ptq_ascend.validation import (
    FLOAT_DTYPES,
    CheckpointError,
    TensorSpec,
    dtype_problem,
    require_kv_cache_values,
    require_nonzero_finite,
    require_positive_finite,
    where,
)

PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
FUSED_CLASS = {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear"}
ROW_PARALLEL = ("o_proj", "down_proj", "dense", "out_proj", "dense_4h_to_h")
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
UNQUANTIZED = "unquantized"
# tensors only a quantized linear layer has (compressed-tensors and msModelSlim)
QUANT_SUFFIXES = {
    "weight_packed",
    "weight_scale",
    "weight_shape",
    "weight_zero_point",
    "weight_g_idx",
    "weight_offset",
    "deq_scale",
    "quant_bias",
}


class InspectUsageError(Exception):
    """Bad argument: no directory, no quantization config, an unreadable file (exit code 2)."""


@dataclass
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype | str
    shape: tuple[int, ...]


@dataclass
class LayerReport:
    name: str
    shards: list[str]
    scheme: str
    group: str | None = None
    tensors: list[TensorInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    path: str
    kind: str
    layers: list[LayerReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not tied to one layer
    notes: list[str] = field(default_factory=list)  # facts for serving it, not problems

    def all_problems(self) -> list[str]:
        return self.problems + [p for layer in self.layers for p in layer.problems]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "layers": [
                {
                    "name": lr.name,
                    "shards": lr.shards,
                    "scheme": lr.scheme,
                    "group": lr.group,
                    "tensors": [
                        {"name": t.name, "file": t.file, "dtype": _dtype_str(t.dtype), "shape": list(t.shape)}
                        for t in lr.tensors
                    ],
                    "problems": lr.problems,
                }
                for lr in self.layers
            ],
            "problems": self.all_problems(),
            "notes": self.notes,
            "ok": not self.all_problems(),
        }


def _dtype_str(d: torch.dtype | str) -> str:
    return str(d).removeprefix("torch.")


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class Checkpoint:
    """The safetensors files of a directory: headers read once, tensors loaded on demand."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        self.root = root
        self.tensors: dict[str, TensorInfo] = {}
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise InspectUsageError(f"{root}: no *.safetensors files")
        for f in files:
            try:
                with safe_open(f, framework="pt") as st:
                    for name in st.keys():
                        sl = st.get_slice(name)
                        code = sl.get_dtype()
                        self.tensors[name] = TensorInfo(
                            name, f.name, ST_DTYPES.get(code) or code, tuple(sl.get_shape())
                        )
            except Exception as e:  # truncated or corrupt header
                raise InspectUsageError(f"{f}: unreadable safetensors file ({e})") from None
        self.files = {n: t.file for n, t in self.tensors.items()}

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.root / self.files[name], framework="pt") as st:
            return st.get_tensor(name)


def _read_config(root: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, quantization dict, config.json) or raise InspectUsageError."""
    from vllm_ptq_ascend.formats.msmodelslim import DESCRIPTION_FILE

    if not root.is_dir():
        raise InspectUsageError(f"{root}: not a directory")
    cfg: dict[str, Any] = {}
    cfg_file = root / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise InspectUsageError(f"{cfg_file}: unreadable ({e})") from None
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        method = qc.get("quant_method")
        if method not in ("compressed-tensors", QUANT_METHOD):
            raise InspectUsageError(
                f"{cfg_file}: quantization_config has quant_method {method!r}; "
                f"{QUANT_METHOD} reads compressed-tensors checkpoints and msModelSlim ones"
            )
        return "compressed-tensors", qc, cfg
    desc_file = root / DESCRIPTION_FILE
    if desc_file.is_file():
        try:
            return "msModelSlim", json.loads(desc_file.read_text()), cfg
        except (OSError, ValueError) as e:
            raise InspectUsageError(f"{desc_file}: unreadable ({e})") from None
    raise InspectUsageError(
        f"{root}: no quantization config (config.json has no quantization_config "
        f"and there is no {DESCRIPTION_FILE})"
    )


def _module_class(prefix: str) -> str:
    last = prefix.rsplit(".", 1)[-1]
    if last in FUSED_CLASS:
        return FUSED_CLASS[last]
    if last == "lm_head":
        return "ParallelLMHead"
    return "RowParallelLinear" if last in ROW_PARALLEL else "ColumnParallelLinear"


def _fake_module(prefix: str) -> torch.nn.Module:
    """Stands in for the vLLM layer in class-name target matching."""
    return type(_module_class(prefix), (torch.nn.Module,), {})()


def _layers(
    ckpt: Checkpoint, rotation_modules: set[str] = frozenset()
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(vLLM layer -> its checkpoint shards, checkpoint prefix -> tensor suffixes); an online
    rotation's tensor (``<layer>.<group>_<location>.weight``) is not a layer."""
    by_prefix: dict[str, list[str]] = {}
    for name in ckpt.tensors:
        if "." in name:
            prefix, suffix = name.rsplit(".", 1)
            if prefix.rpartition(".")[2] in rotation_modules:
                continue
            by_prefix.setdefault(prefix, []).append(suffix)
    leaves = []
    for prefix, suffixes in by_prefix.items():
        if "embed" in prefix.rsplit(".", 1)[-1]:
            continue
        w = ckpt.tensors.get(f"{prefix}.weight")
        # a quantized layer whose weight is missing is still a layer (reported as missing)
        if (w is not None and len(w.shape) == 2) or set(suffixes) & QUANT_SUFFIXES:
            leaves.append(prefix)
    shard_of = {s: fused for fused, shards in PACKED_MODULES.items() for s in shards}
    layers: dict[str, list[str]] = {}
    for prefix in sorted(leaves, key=_natural):
        parent, _, last = prefix.rpartition(".")
        fused = shard_of.get(last)
        if fused:
            layer = f"{parent}.{fused}" if parent else fused
            layers[layer] = [f"{parent}.{s}" if parent else s for s in PACKED_MODULES[fused]]
        else:
            layers[prefix] = [prefix]
    return layers, by_prefix


def _geometry(scheme, shard: str, ckpt: Checkpoint) -> tuple[int, int] | None:
    """(out, in) of one checkpoint shard, from ``weight_shape``, ``weight`` or ``weight_packed``."""
    t = ckpt.tensors
    if f"{shard}.weight_shape" in t:
        try:
            out_f, in_f = (int(v) for v in ckpt.load(f"{shard}.weight_shape").tolist())
            return out_f, in_f
        except (TypeError, ValueError):
            pass
    w = t.get(f"{shard}.weight")
    if w is not None and len(w.shape) == 2:
        out_f, in_f = w.shape
        dim = scheme.packed_dim() if hasattr(scheme, "packed_dim") else None
        if dim == 0:
            out_f *= 2
        elif dim == 1:
            in_f *= 2
        return out_f, in_f
    p = t.get(f"{shard}.weight_packed")
    bits = getattr(getattr(scheme, "spec", None), "num_bits", None) or 4
    if p is not None and len(p.shape) == 2:
        return p.shape[0], p.shape[1] * 32 // bits
    return None


def _rotation_entries(rotations) -> list[tuple[str, str, Any]]:
    """(group, location, TransformArgs) of each online rotation entry of the config."""
    from vllm_ptq_ascend.formats.transforms import location_name

    if rotations is None:
        return []
    return [
        (group, location_name(args), args)
        for group, scheme in rotations.config_groups.items()
        for args in scheme.apply
        if args.is_online()
    ]


def _rotation_problems(ckpt: Checkpoint, rotations, geometry: dict[str, tuple[int, int]]) -> list[str]:
    """Each stored rotation a square Hadamard matrix, and one stored for every size a layer needs
    (compressed-tensors stores a rotation shared by all layers of a size once)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
        find_matched_target,
        should_ignore_layer,
    )

    from vllm_ptq_ascend.serving.online_transforms import MAX_HADAMARD_ERROR, hadamard_error

    entries = _rotation_entries(rotations)
    problems, stored = [], set()
    for name, info in ckpt.tensors.items():
        prefix, _, leaf = name.rpartition(".")
        shard, _, module = prefix.rpartition(".")
        for group, location, _args in entries:
            if module != f"{group}_{location}":
                continue
            at = where(ckpt.files, shard, f"{module}.{leaf}")
            if leaf != "weight" or len(info.shape) != 2 or info.shape[0] != info.shape[1]:
                problems.append(f"{at}: shape {list(info.shape)}, expected a square rotation 'weight'")
                continue
            err = hadamard_error(ckpt.load(name))
            if err > MAX_HADAMARD_ERROR:
                problems.append(f"{at}: not a Hadamard matrix (H·Hᵀ/n is off the identity by {err:.3g})")
                continue
            stored.add((module, info.shape[0]))
    for shard, (out_f, in_f) in geometry.items():
        for group, location, args in entries:
            module = f"{group}_{location}"
            if should_ignore_layer(shard, ignore=list(args.ignore)):
                continue
            if find_matched_target(shard, _fake_module(shard), list(args.targets)) is None:
                continue
            n = rotations.config_groups[group].head_dim or (in_f if location == "input" else out_f)
            if (module, n) not in stored:
                problems.append(
                    f"{where(ckpt.files, shard, f'{module}.weight')}: the {n}x{n} {location} rotation of "
                    f"transform group {group!r} is stored for no layer of the checkpoint"
                )
                stored.add((module, n))  # reported once
    return problems


def _check_shard(
    scheme, layer: str, shard: str, ckpt: Checkpoint, suffixes: list[str], label_note: str
) -> list[str]:
    problems: list[str] = []
    files = ckpt.files
    geometry = _geometry(scheme, shard, ckpt) if scheme is not None else None
    if scheme is None:
        specs = {"weight": TensorSpec(FLOAT_DTYPES)}
    elif geometry is None:
        return [f"{where(files, shard, 'weight')}: missing from the checkpoint (no weight to size the layer)"]
    else:
        try:
            specs = scheme.checkpoint_tensors(*geometry)
        except CheckpointError as e:  # e.g. group size does not divide the input
            return [str(e)]
    what = scheme.describe() if scheme is not None else "an unquantized layer"
    for name, spec in specs.items():
        info = ckpt.tensors.get(f"{shard}.{name}")
        at = where(files, shard, name)
        if info is None:
            if spec.required:
                problems.append(f"{at}: missing from the checkpoint (expected for {what}{label_note})")
            continue
        bad = (
            dtype_problem(info.dtype, spec.dtypes)
            if isinstance(info.dtype, torch.dtype)
            else (f"dtype {info.dtype}, expected one of: {', '.join(_dtype_str(d) for d in spec.dtypes)}")
        )
        if bad:
            problems.append(f"{at}: {bad} (for {what}{label_note})")
            continue
        if spec.shapes is not None and info.shape not in spec.shapes:
            expected = " or ".join(str(list(s)) for s in spec.shapes)
            problems.append(f"{at}: shape {list(info.shape)}, expected {expected} (for {what}{label_note})")
            continue
        if spec.scale:
            t = ckpt.load(f"{shard}.{name}")
            if t.dtype == torch.int64:  # msModelSlim deq_scale: float32 bit patterns
                t = t.to(torch.int32).view(torch.float32)
            try:
                check = require_nonzero_finite if spec.signed else require_positive_finite
                check(shard, name, t, files)
            except CheckpointError as e:
                problems.append(str(e))
    allowed = set(specs) | {"bias"}
    for suffix in suffixes:
        if suffix not in allowed:
            problems.append(
                f"{where(files, shard, suffix)}: unexpected tensor for {what}{label_note} "
                f"(expected: {', '.join(specs)})"
            )
    return problems


def _kv_geometry(model_cfg: dict[str, Any]) -> tuple[int, int]:
    """(KV heads, head_dim) from config.json, for the sizes of per-head and per-channel KV scales."""
    heads = model_cfg.get("num_attention_heads") or 1
    head_dim = model_cfg.get("head_dim") or (model_cfg.get("hidden_size") or 0) // heads
    return model_cfg.get("num_key_value_heads") or heads, head_dim


def _kv_tensor_problems(ckpt: Checkpoint, entries, expected: int, missing: str, misshapen: str) -> list[str]:
    """Each (attention block, tensor name) of ``entries``: present, ``expected`` values, and values
    (``validation.require_kv_cache_values``) that vLLM can use; ``missing`` / ``misshapen`` say why."""
    problems = []
    for block, name in entries:
        at = where(ckpt.files, block, name)
        info = ckpt.tensors.get(f"{block}.{name}")
        if info is None:
            problems.append(f"{at}: {missing}")
        elif math.prod(info.shape) != expected:
            problems.append(f"{at}: shape {list(info.shape)}; {misshapen}")
        else:
            try:
                require_kv_cache_values(block, name, ckpt.load(f"{block}.{name}"), ckpt.files)
            except CheckpointError as e:
                problems.append(str(e))
    return problems


def _kv_cache_problems(ckpt: Checkpoint, qcfg: dict[str, Any], model_cfg: dict[str, Any]) -> list[str]:
    """A quantized KV cache needs finite, positive k_scale and v_scale in every attention block: one
    each, or one per KV head."""
    from vllm_ptq_ascend.formats.kv_cache import KV_SCALE_NAMES, plan_kv_cache

    try:
        plan = plan_kv_cache(qcfg.get("kv_cache_scheme"))
    except CheckpointError as e:
        return [str(e)]
    if plan is None:
        return []
    expected = plan.scales_per_layer(_kv_geometry(model_cfg)[0], 1)  # per layer or per KV head
    # attention blocks, found by their key projection
    blocks = sorted({n.split(".k_proj.")[0] for n in ckpt.tensors if ".k_proj." in n}, key=_natural)
    return _kv_tensor_problems(
        ckpt,
        [(block, name) for block in blocks for name in KV_SCALE_NAMES],
        expected,
        "missing (the kv_cache_scheme needs scales in every attention block)",
        f"the kv_cache_scheme (strategy {plan.strategy!r}) has {expected} scale(s) per block",
    )


def _c8_problems(ckpt: Checkpoint, desc, model_cfg: dict[str, Any]) -> list[str]:
    """msModelSlim's C8 tensors: present, one value per channel (KV heads x head_dim), scales finite
    and positive, offsets finite and within int8."""
    from vllm_ptq_ascend.formats.msmodelslim import DESCRIPTION_FILE

    heads, head_dim = _kv_geometry(model_cfg)
    entries = [key.split(".self_attn.") for key in sorted(desc.c8_tensors, key=_natural)]
    return _kv_tensor_problems(
        ckpt,
        [(f"{block}.self_attn", name) for block, name in entries],
        heads * head_dim,
        f"labelled C8 in {DESCRIPTION_FILE}, but in no safetensors file",
        f"C8 has one value per channel ({heads * head_dim})",
    )


ROW_PARALLEL_LAYERS = ("o_proj", "down_proj")  # vLLM's RowParallelLinear layers of a decoder block
# ours (every layer's, o_proj's per-head one), msModelSlim's
LEFT_FACTORS = (f"{TRANSFORM_GROUP}_input.left", f"{HEADS_GROUP}_input.left", "left_trans")


def _tensor_parallel_notes(ckpt: Checkpoint) -> list[str]:
    """At which tensor-parallel sizes the FlatQuant transforms of row-parallel layers can be served:
    each rank applies its diagonal block of the left factor, so it must be block-diagonal over them."""
    from vllm_ptq_ascend.formats.kronecker import diagonal_blocks

    blocks = []
    for name in ckpt.tensors:
        layer = next((name[: -len(f) - 1] for f in LEFT_FACTORS if name.endswith(f".{f}")), None)
        if layer is None or layer.rsplit(".", 1)[-1] not in ROW_PARALLEL_LAYERS:
            continue
        left = ckpt.load(name)
        if left.dim() == 2 and left.shape[0] == left.shape[1]:
            blocks.append(diagonal_blocks(left))
    if not blocks:
        return []
    tp = math.gcd(*blocks)
    if tp == 1:
        return [
            "tensor parallelism: the FlatQuant transforms of o_proj/down_proj are dense, so vLLM serves this "
            "checkpoint at tensor_parallel_size 1 (quantize with --tp N to serve it at N)"
        ]
    return [
        f"tensor parallelism: the FlatQuant transforms of o_proj/down_proj are block-diagonal over {tp} "
        f"ranks, so vLLM serves this checkpoint at a tensor_parallel_size dividing {tp}"
    ]


def inspect(path: str | Path) -> Report:
    """Inspect a checkpoint directory; raises InspectUsageError for bad arguments."""
    root = Path(path)
    kind, qcfg, model_cfg = _read_config(root)
    ckpt = Checkpoint(root)

    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    from vllm_ptq_ascend.formats.compressed_tensors import parse_ct_config, plan_groups
    from vllm_ptq_ascend.formats.msmodelslim import (
        DESCRIPTION_FILE,
        DESCRIPTION_KEYS,
        FA3_SUFFIX,
        ModelSlimDescription,
    )
    from vllm_ptq_ascend.formats.transforms import parse_transform_config
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    report = Report(str(root), kind)
    try:
        rotations = parse_transform_config((qcfg or {}).get("transform_config")).rotations
    except CheckpointError as e:
        report.problems.append(str(e))
        return report
    layers, by_prefix = _layers(ckpt, {f"{g}_{loc}" for g, loc, _ in _rotation_entries(rotations)})
    geometries: dict[str, tuple[int, int]] = {}

    if kind == "msModelSlim":
        try:
            desc = ModelSlimDescription(qcfg, strict=False)
        except CheckpointError as e:
            report.problems.append(str(e))
            return report
        # what is not served outside linear layers (KV-cache / attention quantization, rotations)
        report.problems.extend(desc.problems)
        # C8 KV-cache tensors sit under k_proj / v_proj but belong to the attention block
        for key in desc.c8_tensors:
            prefix, suffix = key.rsplit(".", 1)
            if suffix in by_prefix.get(prefix, []):
                by_prefix[prefix].remove(suffix)
        report.problems.extend(_c8_problems(ckpt, desc, model_cfg or {}))
        config = PtqAscendConfig(None, {}, qcfg, desc)
        for key, label in qcfg.items():
            # non-tensor keys: the description's own ('version', 'metadata', ...) and FA3's
            # '<attention block>.quant_type' (already reported as not served)
            if key in DESCRIPTION_KEYS or key.endswith(FA3_SUFFIX):
                continue
            if key not in ckpt.tensors:
                report.problems.append(
                    f"{DESCRIPTION_FILE}: label {label!r} for tensor '{key}' (layer "
                    f"'{key.rsplit('.', 1)[0]}'), which is in no safetensors file"
                )
    else:
        errors: list[CheckpointError] = []
        try:
            ct, raw, g_idx = parse_ct_config(qcfg)
        except CheckpointError as e:
            report.problems.append(str(e))
            return report
        plans = plan_groups(ct, g_idx, errors)
        report.problems.extend(str(e) for e in errors)
        config = PtqAscendConfig(ct, plans, raw)
    config.packed_modules_mapping = PACKED_MODULES
    config.files = ckpt.files

    used_groups: set[str] = set()
    for layer, shards in layers.items():
        module = _fake_module(layer)
        lr = LayerReport(layer, shards, UNQUANTIZED)
        report.layers.append(lr)
        for shard in shards:
            lr.tensors += [ckpt.tensors[f"{shard}.{s}"] for s in by_prefix.get(shard, [])]
        note = ""
        if config.modelslim is not None:
            labels = {config.modelslim.labels.get(f"{s}.weight") for s in shards} - {None}
            note = f"; label {'/'.join(sorted(labels))} in {DESCRIPTION_FILE}" if labels else ""
        else:
            for shard in shards:  # which groups serve a layer, for unused-group detection
                try:
                    g = config.group_for(shard, module)
                except CheckpointError:
                    g = None
                if g:
                    used_groups.add(g)
        try:
            if module.__class__.__name__ == "ParallelLMHead":  # not a LinearBase in vLLM
                scheme = None
            else:
                scheme = config.scheme_for(layer, module)
        except CheckpointError as e:
            lr.scheme = "?"
            lr.problems.append(str(e))
            continue
        except ValueError as e:  # vLLM's should_ignore_layer on fused shards
            lr.scheme = "?"
            lr.problems.append(f"config.json: layer '{layer}': {e}")
            continue
        if config.modelslim is None and scheme is not None:
            lr.group = config.group_for(layer, module)
        if scheme is None and config.modelslim is None:
            g = config.group_for(layer, module)
            if g and g not in config.plans:  # unsupported group: already reported
                lr.scheme = f"? (config group '{g}' is not supported)"
                continue
        lr.scheme = scheme.describe() if scheme is not None else UNQUANTIZED
        in_sizes: dict[int, str] = {}  # fused shards read one input: same input size
        for shard in shards:
            if shard not in by_prefix:
                lr.problems.append(
                    f"{where(ckpt.files, layer, 'weight', shards)}: shard '{shard}' of this fused layer "
                    "has no tensors in the checkpoint"
                )
                continue
            geometry = _geometry(scheme, shard, ckpt) if scheme is not None else None
            if geometry is None and f"{shard}.weight" in ckpt.tensors:
                geometry = ckpt.tensors[f"{shard}.weight"].shape
            if geometry is not None and len(geometry) == 2:
                geometries[shard] = tuple(geometry)
            if geometry and len(shards) > 1:
                in_sizes.setdefault(geometry[-1], shard)
            for p in _check_shard(scheme, layer, shard, ckpt, by_prefix[shard], note):
                if p not in lr.problems:  # a layer-wide problem (group size) is found once per shard
                    lr.problems.append(p)
        if len(in_sizes) > 1:
            (size0, first), *rest = in_sizes.items()
            for size, shard in rest:
                lr.problems.append(
                    f"{where(ckpt.files, shard, 'weight')}: input size {size}, but shard '{first}' of the "
                    f"same fused layer '{layer}' has {size0} (they read one input)"
                )

    report.problems.extend(_rotation_problems(ckpt, rotations, geometries))
    report.notes.extend(_tensor_parallel_notes(ckpt))
    if kind != "msModelSlim":
        report.problems.extend(_kv_cache_problems(ckpt, qcfg or {}, model_cfg or {}))
    if config.modelslim is None:
        names = [s for shards in layers.values() for s in shards]
        if "lm_head" not in names and model_cfg.get("tie_word_embeddings"):
            names.append("lm_head")  # tied: vLLM still has the layer, the checkpoint no tensor
        for group, cg in config.ct_config.config_groups.items():
            if group not in used_groups:
                report.problems.append(
                    f"config.json: quantization_config.config_groups['{group}'] (targets "
                    f"{cg.targets}) matches no layer of the checkpoint"
                )
        for entry in config.ignore:
            if not any(should_ignore_layer(n, ignore=[entry]) for n in names):
                report.problems.append(
                    f"config.json: quantization_config.ignore entry {entry!r} matches no layer "
                    "of the checkpoint"
                )
    return report


def format_report(report: Report) -> str:
    lines = [f"{report.path} ({report.kind})"]
    for lr in report.layers:
        group = f" [{lr.group}]" if lr.group else ""
        lines.append(f"{lr.name}: {lr.scheme}{group}")
        for t in lr.tensors:
            lines.append(f"    {t.name:60} {_dtype_str(t.dtype):9} {list(t.shape)}  {t.file}")
        for p in lr.problems:
            lines.append(f"  PROBLEM: {p}")
    for p in report.problems:
        lines.append(f"PROBLEM: {p}")
    lines += [f"NOTE: {n}" for n in report.notes]
    n_unknown = sum(1 for lr in report.layers if lr.scheme.startswith("?"))
    n_float = sum(1 for lr in report.layers if lr.scheme == UNQUANTIZED)
    n_q = len(report.layers) - n_unknown - n_float
    problems = report.all_problems()
    unknown = f", {n_unknown} without a scheme" if n_unknown else ""
    lines.append(
        f"summary: {len(report.layers)} layers ({n_q} quantized, {n_float} unquantized{unknown}), "
        f"{len(problems)} problem(s){'' if problems else ': OK'}"
    )
    return "\n".join(lines)


def main(path: str, as_json: bool = False) -> int:
    """Print the report; 0 if clean, 1 on any problem (InspectUsageError -> caller, exit 2)."""
    report = inspect(path)
    print(json.dumps(report.to_json(), indent=2) if as_json else format_report(report))
    return 1 if report.all_problems() else 0
