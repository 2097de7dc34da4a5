"""Pure-torch float64 references, written independently of the package under test.

`unpack_int32` re-derives compressed-tensors' dense little-endian packing from
its definition; the fake-quant model dequantizes a checkpoint's tensors and
quantizes activations exactly as the config says, all in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def unpack_int32(packed: torch.Tensor, num_bits: int, n: int, dim: int) -> torch.Tensor:
    """Signed values from int32 words holding `num_bits`-wide unsigned fields (value + 2^(bits-1))."""
    p = packed if dim == 1 else packed.t()
    words = p.to(torch.int64) & 0xFFFFFFFF
    per = 32 // num_bits
    fields = [(words >> (num_bits * i)) & ((1 << num_bits) - 1) for i in range(per)]
    vals = torch.stack(fields, dim=-1).reshape(p.shape[0], -1)[:, :n]
    vals = vals - (1 << (num_bits - 1))
    return vals if dim == 1 else vals.t()


def pack_int32(values: torch.Tensor, num_bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack_int32 (for building hand-made checkpoints in tests)."""
    v = values if dim == 1 else values.t()
    per = 32 // num_bits
    u = (v.to(torch.int64) + (1 << (num_bits - 1))) & ((1 << num_bits) - 1)
    pad = (-u.shape[1]) % per
    u = torch.nn.functional.pad(u, (0, pad)).reshape(u.shape[0], -1, per)
    words = sum(u[..., i] << (num_bits * i) for i in range(per))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def quant_per_token(x: torch.Tensor, bits: int = 8, clip: float = 1.0) -> torch.Tensor:
    """Fake-quantize each row to symmetric int`bits` with scale clip * max|x| / qmax (float64)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-10) * clip / qmax
    return torch.round(x / s).clamp(-qmax - 1, qmax) * s


def quant_per_slice(x: torch.Tensor, bits: int, clip: float, slices: int) -> torch.Tensor:
    """quant_per_token on each of ``slices`` equal slices of every row: what the ranks of a row-parallel
    layer, each holding one slice of its input, quantize."""
    return torch.cat([quant_per_token(part, bits, clip) for part in x.chunk(slices, dim=-1)], dim=-1)


def kron_rows(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x @ torch.kron(left, right), formed densely (independent of the package's factored form)."""
    return x @ torch.kron(left.double(), right.double())


def quant_per_token_asym(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize each row to asymmetric int8 over [min(x, 0), max(x, 0)] (float64).

    What torch's reference ``_dyn_quant_matmul_4bit`` (stock vLLM-CPU's W4A8 path on x86) does.
    """
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255.0).clamp(min=1e-10)
    zp = torch.round(-128 - lo / s)
    return (torch.round(x / s) + zp).clamp(-128, 127).sub(zp) * s


def quant_static(x: torch.Tensor, scale: float, zp: int = 0) -> torch.Tensor:
    q = torch.round(x / scale) + zp
    return (q.clamp(-128, 127) - zp) * scale


def dequant_weight(sd: dict, name: str, wargs: dict) -> torch.Tensor:
    """float64 weight [out, in] of layer `name` from its checkpoint tensors."""
    bits = wargs["num_bits"]
    scale = sd[f"{name}.weight_scale"].double()
    if f"{name}.weight_packed" in sd:
        out_f, in_f = (int(v) for v in sd[f"{name}.weight_shape"])
        q = unpack_int32(sd[f"{name}.weight_packed"], bits, in_f, 1)
    else:
        q = sd[f"{name}.weight"].to(torch.int64)
        out_f, in_f = q.shape
    zp = sd.get(f"{name}.weight_zero_point")
    if zp is not None:
        zp = unpack_int32(zp, bits, out_f, 0) if zp.shape[0] != out_f else zp.to(torch.int64)
    if scale.numel() == 1 or scale.dim() == 1:
        groups = torch.zeros(in_f, dtype=torch.long)
        scale = scale.reshape(1, 1).expand(out_f, 1)
    elif f"{name}.weight_g_idx" in sd:
        groups = sd[f"{name}.weight_g_idx"].long()
    else:
        groups = torch.arange(in_f) // (in_f // scale.shape[1])
    w = q.double()
    if zp is not None:
        w = w - zp.double()[:, groups]
    return w * scale[:, groups]


class OnlineRotations:
    """Online rotations of a checkpoint's transform_config (QuIP): linear name -> (input, output)
    functions x -> x·H/√n (H transposed where the entry is inverse), block diagonal with head_dim.
    A matrix is read from any stored tensor of its group, location and size: compressed-tensors
    stores one per size."""

    def __init__(self, transform_config: dict | None, sd: dict):
        self.entries = []
        for group, scheme in ((transform_config or {}).get("config_groups") or {}).items():
            if scheme["type"] == "flatquant-kronecker":
                continue
            for args in scheme["apply"]:
                if args["location"] in ("input", "output"):
                    self.entries.append((group, scheme.get("head_dim"), args))
        self.stored = {}
        for k, v in sd.items():
            for group, _, args in self.entries:
                if k.endswith(f".{group}_{args['location']}.weight"):
                    self.stored[(group, args["location"], v.shape[0])] = v.double()

    def owns(self, key: str) -> bool:
        return any(key.endswith(f".{g}_{a['location']}.weight") for g, _, a in self.entries)

    def __call__(self, name: str, module: torch.nn.Linear):
        from compressed_tensors.utils import is_match

        found = {"input": None, "output": None}
        for group, head_dim, args in self.entries:
            if not is_match(name, module, args["targets"], args.get("ignore", [])):
                continue
            loc = args["location"]
            n = head_dim or (module.in_features if loc == "input" else module.out_features)
            h = self.stored[(group, loc, n)]
            matrix = (h.T if args.get("inverse") else h) / n**0.5
            found[loc] = lambda x, m=matrix: (x.unflatten(-1, (-1, m.shape[0])) @ m).flatten(-2)
        return found["input"], found["output"]


FP8_E4M3_MAX = 448.0
KV_FP8_ATTENTION = "ptq_reference_kv_fp8"


def _e4m3_magnitudes() -> torch.Tensor:
    """Every finite non-negative float8_e4m3fn value, ascending (from the 256 codes)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return codes[torch.isfinite(codes) & (codes >= 0)].unique().sort().values


def fake_quant_fp8(x: torch.Tensor, scale: float, rounding: str = "nearest") -> torch.Tensor:
    """x on the float8_e4m3fn grid with a static scale, times the scale: x / s clamped to ±448 and
    rounded to the nearest e4m3 value (ties to even), or toward zero (what vLLM-CPU's cache write does)."""
    y = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    if rounding == "nearest":
        return y.to(torch.float8_e4m3fn).to(x.dtype) * scale
    assert rounding == "toward_zero", rounding
    grid = _e4m3_magnitudes().to(x.dtype)
    below = grid[torch.searchsorted(grid, y.abs().contiguous(), right=True) - 1]  # largest value <= |y|
    return torch.sign(y) * below * scale


def _kv_fp8_attention(module, query, key, value, *args, **kwargs):
    """transformers' sdpa attention on keys and values read back from an fp8 cache (the module's
    ``kv_fp8``: scales and rounding), as an fp8 KV cache serves every token, the prompt's included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "kv_fp8", None)
    if kv is not None:
        (k_scale, v_scale), rounding = kv
        key, value = fake_quant_fp8(key, k_scale, rounding), fake_quant_fp8(value, v_scale, rounding)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def _use_kv_fp8(model, sd: dict, rounding: str) -> None:
    """Attach each attention block's checkpoint k_scale / v_scale and switch to the fp8-cache attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(KV_FP8_ATTENTION, _kv_fp8_attention)
    for name, module in model.named_modules():
        if f"{name}.k_scale" in sd:
            module.kv_fp8 = (tuple(float(sd[f"{name}.{t}_scale"].double()) for t in "kv"), rounding)
    model.config._attn_implementation = KV_FP8_ATTENTION


def _compose(rotate, quant):
    """A forward pre-hook: rotate the input, then quantize it (either may be None)."""

    def hook(mod, args):
        x = args[0] if rotate is None else rotate(args[0])
        return quant(mod, (x,)) if quant is not None else (x,)

    return hook


class FakeQuantModel:
    """The checkpoint's architecture in float64 with dequantized weights and quantized activations."""

    def __init__(
        self,
        ckpt: str | Path,
        asymmetric_tokens: bool = False,
        kv_cache: bool = True,
        kv_rounding="nearest",
        tensor_parallel: int = 1,
    ):
        """``tensor_parallel``: the row-parallel layers' (o_proj, down_proj) input is split over that many
        ranks, which each quantize their slice of a FlatQuant layer's transformed activations."""
        from transformers import AutoConfig, AutoModelForCausalLM

        ckpt = Path(ckpt)
        cfg = AutoConfig.from_pretrained(ckpt)
        qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        self.model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
        sd = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            sd.update(load_file(f))
        (group,) = qcfg["config_groups"].values()  # tests build single-group checkpoints
        ignore = set(qcfg.get("ignore", []))
        rotations = OnlineRotations(qcfg.get("transform_config"), sd)
        state = {}
        for mname, module in self.model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            rotate_in, rotate_out = rotations(mname, module)
            if rotate_out is not None:  # after the bias, as compressed-tensors' output hook
                module.register_forward_hook(lambda mod, args, out, r=rotate_out: r(out))
            if mname in ignore:
                state[f"{mname}.weight"] = sd[f"{mname}.weight"].double()
                continue
            state[f"{mname}.weight"] = dequant_weight(sd, mname, group["weights"])
            acts = group.get("input_activations")
            slices = tensor_parallel if mname.endswith(("o_proj", "down_proj")) else 1
            quant = self._act_hook(sd, mname, acts, asymmetric_tokens, slices) if acts else None
            if rotate_in is not None or quant is not None:
                module.register_forward_pre_hook(_compose(rotate_in, quant))
        for k, v in sd.items():
            if (
                k not in state
                and not any(k.endswith(s) for s in ("_scale", "_zero_point", "_packed", "_shape", "_g_idx"))
                and ".flatquant_input." not in k
                and ".flatquant_heads_input." not in k
                and not rotations.owns(k)
            ):
                state.setdefault(k, v.double())
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all("rotary" in m for m in missing), missing
        if kv_cache and qcfg.get("kv_cache_scheme"):  # kv_cache=False: the same weights, a bf16 cache
            _use_kv_fp8(self.model, sd, kv_rounding)

    @staticmethod
    def _act_hook(sd, name, acts, asymmetric_tokens=False, slices=1):
        # FlatQuant: online transform, clip, quantize (o_proj's per-head transform: its own group)
        holder = next(
            (h for h in ("flatquant_input", "flatquant_heads_input") if f"{name}.{h}.left" in sd), None
        )
        if holder is not None:
            left, right = sd[f"{name}.{holder}.left"], sd[f"{name}.{holder}.right"]
            clip = float(sd[f"{name}.{holder}.clip_ratio"].double().reshape(-1)[0])
            bits = acts["num_bits"]
            return lambda mod, args: (quant_per_slice(kron_rows(args[0], left, right), bits, clip, slices),)
        if acts["dynamic"]:
            if asymmetric_tokens:
                return lambda mod, args: (quant_per_token_asym(args[0]),)
            bits = acts["num_bits"]
            return lambda mod, args: (quant_per_token(args[0], bits),)
        scale = float(sd[f"{name}.input_scale"].double().max())
        zp = int(sd[f"{name}.input_zero_point"].item()) if f"{name}.input_zero_point" in sd else 0
        return lambda mod, args: (quant_static(args[0], scale, zp),)

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_i | tokens_<i) for i >= 1."""
        ids = torch.tensor([token_ids])
        logp = torch.log_softmax(self.model(ids).logits[0].double(), -1)
        return [float(logp[i - 1, t]) for i, t in enumerate(token_ids) if i > 0]
