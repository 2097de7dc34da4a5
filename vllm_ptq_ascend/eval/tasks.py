"""The evaluation tasks: shipped items, prompts per chain-of-thought mode, and scoring one reply.

Templates and token budgets are data (``eval/tasks.yaml``); the mode's own markers (``/no_think``,
``enable_thinking``, ...) come from the model family in ``recipes/cot_modes.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vllm_ptq_ascend.eval.metrics import answers_match, extract_answer, strip_thinking

TASKS_FILE = Path(__file__).with_name("tasks.yaml")
GENERATIVE = ("gsm8k", "humaneval")
LOGLIK = ("hellaswag",)
ALL_TASKS = GENERATIVE + LOGLIK
LOGLIK_MODE = "loglik"  # the mode name under which mode-independent tasks are recorded


@dataclass(frozen=True)
class EvalItem:
    task: str
    item_id: str
    data: dict  # the shipped row


@lru_cache(maxsize=None)
def task_specs() -> dict:
    import yaml

    with TASKS_FILE.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict) or set(tasks) != set(ALL_TASKS):
        raise ValueError(f"{TASKS_FILE}: expected tasks {', '.join(ALL_TASKS)}")
    return tasks


def load_items(task: str, limit: int | None = None) -> list[EvalItem]:
    """The shipped items of ``task`` in file order (the first ``limit`` of them)."""
    from vllm_ptq_ascend.assets.shipped_text import gsm8k_items
    from vllm_ptq_ascend.recipes.calibration.shipped import SHIPPED, _read_jsonl_resource

    if task == "gsm8k":
        rows, key = list(gsm8k_items()), "id"
    elif task == "humaneval":
        rows, key = _read_jsonl_resource(*SHIPPED["humaneval"]), "task_id"
    elif task == "hellaswag":
        rows, key = _read_jsonl_resource(*SHIPPED["hellaswag"]), "id"
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(ALL_TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return [EvalItem(task, str(r[key]), r) for r in rows[:limit]]


def user_message(item: EvalItem) -> str:
    template = task_specs()[item.task]["user"]
    if item.task == "gsm8k":
        return template.format(question=item.data["prompt"])
    return template.format(prompt=item.data["prompt"])


def token_budget(task: str, mode_spec: dict, override: int | None = None) -> int:
    if override is not None:
        return override
    budgets = task_specs()[task]["max_tokens"]
    return int(budgets["thinking" if mode_spec.get("think_open") else "direct"])


# ------------------------------------------------------------------ scoring


def score_gsm8k(item: EvalItem, reply: str) -> dict:
    predicted = extract_answer(reply)
    return {"predicted": predicted, "correct": answers_match(predicted, item.data["expected"])}


_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def humaneval_completion(problem: dict, reply: str) -> str:
    """What follows the problem's prompt in the program run by the sandbox.

    A reply holding the whole function (usual for chat models) is appended after the prompt and
    defines it again; a bare body continues the prompt's signature and docstring.
    """
    text = strip_thinking(reply)
    blocks = _CODE_BLOCK.findall(text)
    entry = problem["entry_point"]
    defines = re.compile(rf"^def {re.escape(entry)}\s*\(", re.M)
    code = next((b for b in blocks if defines.search(b)), blocks[0] if blocks else text)
    return "\n" + code if defines.search(code) else code


def hellaswag_sequences(item: EvalItem, tokenizer) -> tuple[list[int], list[list[int]]]:
    """Context token ids and each ending's token ids (a leading space joins them, as in lm-eval)."""
    ctx = f"{item.data['activity_label']}: {item.data['ctx']}"
    ctx_ids = list(tokenizer(ctx)["input_ids"])
    endings = [list(tokenizer(" " + e, add_special_tokens=False)["input_ids"]) for e in item.data["endings"]]
    return ctx_ids, endings
