"""`quantize` checks its own output before publishing it.

The checkpoint just written (in the hidden temporary directory) is loaded back the way
transformers + compressed-tensors load it (weights decompressed from what was written,
fake-quantized activations; FlatQuant transforms attached by compressed-tensors'
``apply_transform_config`` and their factors read from the checkpoint files) and compared
with the original model on held-out shipped text that calibration never uses
(``models.shipped_text.held_out_texts``): the mean KL divergence per token,
KL(original || quantized), and the perplexity of both.

A result far beyond what the preset is expected to do (a wrong fold, corrupted weights or
scales, a broken save) fails the run: ``SelfCheckFailed`` names the numbers and the limits.
The limits are per preset (``PRESET_LIMITS``; ``DEFAULT_LIMITS`` otherwise) and can be
overridden per run (``--max-kl``, ``--max-ppl-ratio``).
"""

from __future__ import annotations

import gc
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# held-out texts scored, and tokens per text: seconds on the tiny model, well under a minute on
# SmolLM2-135M (float32, 2 CPU cores)
SAMPLES = 4
SEQ_LEN = 128


@dataclass(frozen=True)
class Limits:
    """A checkpoint passes when mean KL <= max_kl (nats per token) and its perplexity is at most
    max_ppl_ratio times the original's."""

    max_kl: float = 1.0
    max_ppl_ratio: float = 10.0

    def __post_init__(self):
        for name in ("max_kl", "max_ppl_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"self-check limit {name} must be a positive number, got {value!r}")
        if self.max_ppl_ratio < 1:
            raise ValueError(f"self-check limit max_ppl_ratio must be at least 1, got {self.max_ppl_ratio}")


DEFAULT_LIMITS = Limits()
# Presets whose expected damage is itself beyond the defaults: W4A4 multiplies SmolLM2-135M's
# perplexity by about 690 with round-to-nearest (mean KL 6.1) and by about 150 with FlatQuant
# (KL 4.5; README, "FlatQuant and W4A4"). For them the check catches only a checkpoint that is
# broken outright (a model that has lost the text entirely has KL of the order of log(vocab)).
PRESET_LIMITS: dict[str, Limits] = {
    "w4a4-rtn": Limits(max_kl=9.0, max_ppl_ratio=5000.0),
    "w4a4-flatquant": Limits(max_kl=8.0, max_ppl_ratio=2000.0),
    # llmcompressor's SpinQuant R1+R2 + GPTQ at W4A4 measured 19.6x bf16's perplexity on SmolLM2-135M
    # (issue 18's peer table); ten times that is the limit
    "w4a4-spinquant": Limits(max_kl=6.0, max_ppl_ratio=200.0),
}


def limits_for(preset: str, max_kl: float | None = None, max_ppl_ratio: float | None = None) -> Limits:
    """The preset's limits, with the given ones replacing its own."""
    limits = PRESET_LIMITS.get(preset, DEFAULT_LIMITS)
    given = {k: v for k, v in (("max_kl", max_kl), ("max_ppl_ratio", max_ppl_ratio)) if v is not None}
    return replace(limits, **given)


class SelfCheckFailed(RuntimeError):
    """The written checkpoint measures far worse than its preset allows."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def held_out_samples(tokenizer, samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> list[list[int]]:
    """Token ids of the first ``samples`` held-out texts, at most ``seq_len`` tokens each."""
    from vllm_ptq_ascend.assets.shipped_text import held_out_texts

    texts = held_out_texts()
    if not 1 <= samples <= len(texts):
        raise ValueError(
            f"self-check samples must be between 1 and {len(texts)} (the held-out texts), got {samples}"
        )
    return [tokenizer(t)["input_ids"][:seq_len] for t in texts[:samples]]


def load_source(model_dir, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def load_written(ckpt_dir, dtype="float32"):
    """The checkpoint as written: transformers + compressed-tensors, decompressed and fake-quantized
    (``dequantize=True``); a ``transform_config`` is attached by compressed-tensors and its
    tensors are read from the checkpoint files (transformers' loader ignores both)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ckpt_dir = Path(ckpt_dir)
    config = CompressedTensorsConfig(dequantize=True)  # formerly run_compressed=False
    with warnings.catch_warnings():  # "...the `quantization_config` from the model will be used": as meant
        warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
        model = AutoModelForCausalLM.from_pretrained(
            ckpt_dir, dtype=getattr(torch, dtype), quantization_config=config
        )
    model.eval()
    qcfg = json.loads((ckpt_dir / "config.json").read_text()).get("quantization_config") or {}
    if qcfg.get("transform_config"):
        attach_online_transforms(model, ckpt_dir, qcfg["transform_config"])
    return model


def attach_online_transforms(model, ckpt_dir: Path, transform_config: dict) -> None:
    """compressed-tensors' online transforms on ``model``, their tensors read from the checkpoint.

    Only the online entries are applied: those at ``weight_input`` / ``weight_output`` were fused
    into the stored weights when the checkpoint was saved. Transforms of one size share a tensor
    (compressed-tensors builds one per size), which the checkpoint stores once: every shared
    tensor must be found under at least one of its names.
    """
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors import safe_open

    import vllm_ptq_ascend.formats.kronecker  # noqa: F401  (registers the flatquant-kronecker type)

    config = TransformConfig.model_validate(transform_config)
    for scheme in config.config_groups.values():
        scheme.apply = [args for args in scheme.apply if args.is_online()]
    before = set(model.state_dict())
    apply_transform_config(model, config)
    state = model.state_dict()
    wanted = set(state) - before
    found = {}
    for path in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
    loaded = {state[k].data_ptr() for k in found}
    missing = sorted(k for k in wanted if state[k].data_ptr() not in loaded)
    if missing:
        raise ValueError(f"{ckpt_dir}: transform tensors missing from the checkpoint: {missing[:3]}")
    model.load_state_dict(found, strict=False)


def reference(source, samples: list[list[int]]) -> list:
    """The original model's next-token log-probabilities on ``samples`` (so it can be freed first)."""
    import torch

    with torch.no_grad():
        return [torch.log_softmax(source(torch.tensor([ids])).logits[0, :-1].float(), -1) for ids in samples]


def measure(written, samples: list[list[int]], refs: list) -> dict:
    """KL(original || written) per token and both perplexities on ``samples``."""
    import torch

    kl_sum, nll_src, nll_q, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for ids, ref in zip(samples, refs):
            x = torch.tensor([ids])
            lq = torch.log_softmax(written(x).logits[0, :-1].float(), -1)
            target = x[0, 1:, None]
            kl_sum += (ref.exp() * (ref - lq)).sum().item()
            nll_src -= ref.gather(1, target).sum().item()
            nll_q -= lq.gather(1, target).sum().item()
            count += len(ids) - 1
    ppl_src, ppl_q = math.exp(nll_src / count), math.exp(min(nll_q / count, 700.0))
    return {
        "kl": max(kl_sum / count, 0.0) if math.isfinite(kl_sum) else float("nan"),
        "ppl_original": ppl_src,
        "ppl_quantized": ppl_q if math.isfinite(nll_q) else float("nan"),
        "ppl_ratio": ppl_q / ppl_src if math.isfinite(nll_q) else float("nan"),
        "tokens": count,
    }


def judge(values: dict, limits: Limits) -> list[str]:
    """What is out of bounds, in words (empty when the checkpoint passes). NaN is out of bounds."""
    bad = []
    if not values["kl"] <= limits.max_kl:
        bad.append(f"mean KL {values['kl']:.4g} nats per token (limit {limits.max_kl:g})")
    if not values["ppl_ratio"] <= limits.max_ppl_ratio:
        bad.append(
            f"perplexity {values['ppl_quantized']:.4g} vs {values['ppl_original']:.4g} for the original "
            f"(x{values['ppl_ratio']:.3g}, limit x{limits.max_ppl_ratio:g})"
        )
    return bad


def self_check(
    model_dir,
    ckpt_dir,
    tokenizer,
    limits: Limits = DEFAULT_LIMITS,
    *,
    samples: int = SAMPLES,
    seq_len: int = SEQ_LEN,
    dtype: str = "float32",
) -> dict:
    """Measure the written checkpoint ``ckpt_dir`` against the original ``model_dir``.

    Returns the card's record (``passed``, the numbers, the limits, what was compared). Never raises
    for a bad result: :func:`failure_message` words one, the caller decides.
    """
    start = time.time()
    ids = held_out_samples(tokenizer, samples, seq_len)
    source = load_source(model_dir, dtype)
    refs = reference(source, ids)
    del source  # one model in memory at a time
    gc.collect()
    written = load_written(ckpt_dir, dtype)
    values = measure(written, ids, refs)
    del written, refs
    gc.collect()
    problems = judge(values, limits)
    return {
        "passed": not problems,
        **values,
        "problems": problems,
        "limits": asdict(limits),
        "data": f"{len(ids)} held-out GSM8K texts (never calibrated on), at most {seq_len} tokens each",
        "loaded_as": f"the written checkpoint via transformers + compressed-tensors "
        f"(decompressed, fake-quantized), {dtype}",
        "seconds": round(time.time() - start, 1),
    }


def failure_message(result: dict, out_dir) -> str:
    return (
        f"self-check failed: the checkpoint for {out_dir} measures {'; '.join(result['problems'])} "
        f"on {result['tokens']} held-out tokens; nothing was written. This usually means a broken "
        "quantization step (a wrong fold, corrupted weights or scales). Pass --force to write it anyway "
        "(the model card records the failure), --max-kl / --max-ppl-ratio to change the limits, or "
        "--no-self-check to skip the check."
    )


def card_line(check: dict) -> str:
    """The model card's line for the self-check record."""
    if check.get("skipped"):
        return "- self-check: skipped (--no-self-check)"
    status = "passed" if check["passed"] else "FAILED (written anyway with --force)"
    lim, c = check["limits"], check
    return (
        f"- self-check: {status}; {c['data']} ({c['tokens']} tokens): mean KL {c['kl']:.4f} nats per "
        f"token (limit {lim['max_kl']:g}), perplexity {c['ppl_quantized']:.3f} vs {c['ppl_original']:.3f} "
        f"original (x{c['ppl_ratio']:.3f}, limit x{lim['max_ppl_ratio']:g}); {c['seconds']} s"
    )
