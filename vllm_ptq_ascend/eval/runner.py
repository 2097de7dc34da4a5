"""`vllm-ptq-ascend eval`: the baseline and each checkpoint through vLLM's offline API.

Per model: perplexity on held-out shipped text and the KL divergence of next-token
distributions against the baseline (top-k logprobs), then per chain-of-thought mode the
generative tasks (GSM8K, HumanEval in the sandbox) and once the log-likelihood task
(HellaSwag). Each finished chunk of items is appended to ``items/<model>/<mode>/<task>.jsonl``
at once, so an interrupted run resumes where it stopped; a model whose summary exists is
skipped. Replies are greedy (temperature 0), so reruns and models are comparable item by item.
"""

from __future__ import annotations

import datetime
import gc
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_ptq_ascend.eval import metrics
from vllm_ptq_ascend.eval.models import ModelInfo, describe_models, fitting_max_model_len
from vllm_ptq_ascend.eval.results import (
    EVAL_SCHEMA,
    ResultsError,
    eval_path,
    items_path,
    machine_description,
    read_json,
    write_json_atomic,
)
from vllm_ptq_ascend.eval.sandbox import SandboxLimits, humaneval_program, run_many
from vllm_ptq_ascend.eval.tasks import (
    ALL_TASKS,
    GENERATIVE,
    LOGLIK_MODE,
    EvalItem,
    hellaswag_sequences,
    humaneval_completion,
    load_items,
    score_gsm8k,
    token_budget,
    user_message,
)

TEXT_MODE = "text"  # items/<model>/text/: per-text logprobs behind perplexity and KL


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = ALL_TASKS
    modes: tuple[str, ...] | None = None  # None: every mode of the model's family
    limit: int | tuple[tuple[str, int], ...] | None = None  # first N items: of every task, or per task
    max_tokens: int | None = None  # overrides tasks.yaml's budgets
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    chunk: int = 16  # items per generate call: the unit that is saved, so the unit of resuming
    kl_top_k: int = 20
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)

    def limit_for(self, task: str) -> int | None:
        if isinstance(self.limit, tuple):
            return dict(self.limit).get(task)
        return self.limit

    def fingerprint(self) -> dict:
        """The settings an item's record depends on: records made under others are not mixed in.

        Which tasks, modes and how many items a run covers do not change a record, so a run may
        add tasks, modes or items to the records of an earlier one.
        """
        d = asdict(self)
        for k in ("chunk", "sandbox", "tasks", "modes", "limit"):
            d.pop(k)
        return d

    def describe(self) -> dict:
        """Everything, for the summary file."""
        d = asdict(self)
        d.pop("sandbox")
        d["limit"] = dict(self.limit) if isinstance(self.limit, tuple) else self.limit
        d["tasks"], d["modes"] = list(self.tasks), list(self.modes) if self.modes else None
        return d


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------ per-item records


def read_records(path: Path) -> dict[str, dict]:
    """Finished items of one task, by id; a torn last line (killed mid-write) is dropped."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ResultsError(f"{path}: line {i + 1} is not JSON") from None
        done[rec["id"]] = rec
    return done


def append_records(path: Path, records: list[dict]) -> None:
    """Append records, one JSON line each; a torn last line (killed mid-write) is cut off first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    with path.open("ab+") as f:
        size = f.seek(0, 2)
        if size:
            f.seek(max(size - 65536, 0))
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut < 0 and size > len(tail):
                    raise ResultsError(f"{path}: last line is over 64 KiB and unterminated")
                f.truncate(size - len(tail) + cut + 1)
        f.write(data)
        f.flush()


def _check_fingerprint(results_dir: Path, info: ModelInfo, config: EvalConfig) -> None:
    """Items from a run with other settings must not be mixed into this one."""
    path = Path(results_dir) / "items" / info.name / "run.json"
    want = {"path": info.path, **config.fingerprint()}
    if path.is_file():
        have = read_json(path)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ResultsError(
                f"{path}: items of model {info.name!r} were made with other settings "
                f"({', '.join(diff)}); use another results directory or delete {path.parent}"
            )
    else:
        write_json_atomic(path, want)


# ------------------------------------------------------------------ the engine


def quantization_flag(info: ModelInfo) -> str | None:
    """msModelSlim checkpoints carry no ``quantization_config``, so vLLM cannot pick a method from
    config.json: they are served with ``--quantization ptq_ascend``. Others choose for themselves."""
    from vllm_ptq_ascend import QUANT_METHOD
    from vllm_ptq_ascend.eval.models import MSMODELSLIM_DESCRIPTION

    return QUANT_METHOD if info.quantized and (Path(info.path) / MSMODELSLIM_DESCRIPTION).is_file() else None


class Engine:
    """One vLLM ``LLM`` for one model, with the family's renderer for its CoT modes."""

    def __init__(self, info: ModelInfo, config: EvalConfig, quantization: str | None = None):
        from vllm import LLM

        from vllm_ptq_ascend.recipes.calibration.modes import detect_family
        from vllm_ptq_ascend.recipes.calibration.render import Renderer

        self.llm = LLM(
            info.path,
            dtype=config.dtype,
            max_model_len=fitting_max_model_len(info.path, config.max_model_len),
            enforce_eager=True,
            seed=0,
            max_logprobs=config.kl_top_k,
            quantization=quantization,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.family = detect_family(info.path, self.tokenizer)
        self.renderer = Renderer(self.tokenizer, self.family)
        self.quantization = self.llm.llm_engine.vllm_config.model_config.quantization
        self.max_model_len = self.llm.llm_engine.vllm_config.model_config.max_model_len

    def close(self) -> None:
        del self.llm
        gc.collect()

    def prompt_logprobs(self, token_ids: list[list[int]], top_k: int) -> list[list[dict[int, float]]]:
        """Per sequence, per position >= 1: {token id: logprob} (top-k and the actual token)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
        return [
            [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in out.prompt_logprobs[1:]]
            for out in outs
        ]

    def generate(self, prompts: list[str], max_tokens: int, item_ids: list[str]) -> list[dict]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        ids = [self.renderer.encode(p, templated=self.renderer.has_template) for p in prompts]
        for item_id, prompt_ids in zip(item_ids, ids):
            if len(prompt_ids) + max_tokens > self.max_model_len:
                raise ValueError(
                    f"item {item_id}: prompt of {len(prompt_ids)} tokens + budget of {max_tokens} exceeds "
                    f"max_model_len {self.max_model_len}; raise --max-model-len or lower --max-tokens"
                )
        outs = self.llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        return [
            {
                "output": o.outputs[0].text,
                "token_ids": list(o.outputs[0].token_ids),
                "finished": o.outputs[0].finish_reason != "length",
                "prompt_tokens": len(i),
            }
            for o, i in zip(outs, ids)
        ]


# ------------------------------------------------------------------ measurements


def _text_logprobs(engine: Engine, results_dir: Path, info: ModelInfo, config: EvalConfig) -> list[dict]:
    """Top-k prompt logprobs of each held-out text, cached per model (the baseline's feed KL)."""
    from vllm_ptq_ascend.assets.shipped_text import held_out_texts

    path = items_path(results_dir, info.name, TEXT_MODE, "logprobs")
    done = read_records(path)
    texts = held_out_texts()
    todo = [i for i in range(len(texts)) if str(i) not in done]
    if todo:
        # texts longer than the context are cut (the engine needs one position to generate)
        ids = [list(engine.tokenizer(texts[i])["input_ids"])[: engine.max_model_len - 1] for i in todo]
        lps = engine.prompt_logprobs(ids, config.kl_top_k)
        append_records(
            path,
            [
                {"id": str(i), "token_ids": tid, "positions": [sorted(p.items()) for p in pos]}
                for i, tid, pos in zip(todo, ids, lps)
            ],
        )
        done = read_records(path)
    return [done[str(i)] for i in range(len(texts))]


def _perplexity_and_kl(
    records: list[dict], baseline: list[dict] | None, top_k: int
) -> tuple[dict, dict | None]:
    actual = [
        dict(map(tuple, pos))[tok] for r in records for pos, tok in zip(r["positions"], r["token_ids"][1:])
    ]
    ppl = {"value": metrics.perplexity(actual), "tokens": len(actual)}
    if baseline is None:
        return ppl, None
    base_pos, own_pos = [], []
    for b, r in zip(baseline, records):
        if b["token_ids"] != r["token_ids"]:
            raise ResultsError(
                f"text {r['id']}: tokenized differently than the baseline's; KL needs one tokenizer"
            )
        base_pos += [{int(t): lp for t, lp in p} for p in b["positions"]]
        own_pos += [{int(t): lp for t, lp in p} for p in r["positions"]]
    return ppl, {"mean": metrics.mean_kl(base_pos, own_pos), "tokens": len(base_pos), "top_k": top_k}


def _run_generative(engine, results_dir, info, config, mode, task) -> dict:
    mode_spec = engine.family["modes"][mode]
    items = load_items(task, config.limit_for(task))
    path = items_path(results_dir, info.name, mode, task)
    done = read_records(path)
    todo = [it for it in items if it.item_id not in done]
    budget = token_budget(task, mode_spec, config.max_tokens)
    bar = _progress(len(items), f"{info.name} {mode} {task}")
    bar.update(len(items) - len(todo))
    for start in range(0, len(todo), config.chunk):
        chunk = todo[start : start + config.chunk]
        prompts = [
            engine.renderer.prompt([{"role": "user", "content": user_message(it)}], mode) for it in chunk
        ]
        replies = engine.generate(prompts, budget, [it.item_id for it in chunk])
        records = (
            [_score(it, rep) for it, rep in zip(chunk, replies)]
            if task == "gsm8k"
            else (_score_humaneval(chunk, replies, config))
        )
        append_records(path, records)
        bar.update(len(chunk))
    bar.close()
    done = read_records(path)
    return _summarize_generative(task, [done[it.item_id] for it in items])


def _base_record(item: EvalItem, reply: dict) -> dict:
    ids = reply["token_ids"]
    return {
        "id": item.item_id,
        "output": reply["output"],
        "prompt_tokens": reply["prompt_tokens"],
        "output_tokens": len(ids),
        "finished": reply["finished"],
        "collapsed": metrics.looks_collapsed(ids, reply["finished"]),
    }


def _score(item: EvalItem, reply: dict) -> dict:
    return {**_base_record(item, reply), **score_gsm8k(item, reply["output"])}


def _score_humaneval(chunk: list[EvalItem], replies: list[dict], config: EvalConfig) -> list[dict]:
    programs = [
        humaneval_program(it.data, humaneval_completion(it.data, r["output"]))
        for it, r in zip(chunk, replies)
    ]
    results = run_many(programs, config.sandbox, workers=2)
    return [
        {**_base_record(it, r), "correct": res.passed, "status": res.status, "detail": res.detail[-300:]}
        for it, r, res in zip(chunk, replies, results)
    ]


def _summarize_generative(task: str, records: list[dict]) -> dict:
    summary = metrics.accuracy_summary([bool(r["correct"]) for r in records])
    n = len(records)
    return {
        "metric": "pass@1" if task == "humaneval" else "accuracy",
        **summary,
        "mean_output_tokens": sum(r["output_tokens"] for r in records) / n,
        "repetition_rate": sum(bool(r["collapsed"]) for r in records) / n,
        "unfinished_rate": sum(not r["finished"] for r in records) / n,
    }


def _run_hellaswag(engine, results_dir, info, config) -> dict:
    items = load_items("hellaswag", config.limit_for("hellaswag"))
    path = items_path(results_dir, info.name, LOGLIK_MODE, "hellaswag")
    done = read_records(path)
    todo = [it for it in items if it.item_id not in done]
    bar = _progress(len(items), f"{info.name} hellaswag")
    bar.update(len(items) - len(todo))
    for start in range(0, len(todo), config.chunk):
        chunk = todo[start : start + config.chunk]
        seqs, spans = [], []
        for it in chunk:
            ctx, endings = hellaswag_sequences(it, engine.tokenizer)
            for e in endings:
                spans.append((len(ctx), len(e)))
                seqs.append(ctx + e)
        lps = engine.prompt_logprobs(seqs, 0)
        records = []
        for j, it in enumerate(chunk):
            ending_lps = []
            for k in range(len(it.data["endings"])):
                idx = j * len(it.data["endings"]) + k
                (n_ctx, n_end), seq, pos = spans[idx], seqs[idx], lps[idx]
                # positions are offset by one: pos[i] scores token seq[i + 1]
                ending_lps.append([pos[i - 1][seq[i]] for i in range(n_ctx, n_ctx + n_end)])
            choice = metrics.hellaswag_choice(ending_lps, normalize="chars", ending_texts=it.data["endings"])
            records.append(
                {
                    "id": it.item_id,
                    "choice": choice,
                    "correct": choice == int(it.data["expected_index"]),
                    "ending_logprobs": [sum(lps) for lps in ending_lps],
                    "ending_tokens": [len(lps) for lps in ending_lps],
                }
            )
        append_records(path, records)
        bar.update(len(chunk))
    bar.close()
    done = read_records(path)
    return {
        "metric": "acc_norm",
        **metrics.accuracy_summary([bool(done[it.item_id]["correct"]) for it in items]),
    }


# ------------------------------------------------------------------ the command


def evaluate_model(info: ModelInfo, results_dir: Path, config: EvalConfig, baseline: str, log=print) -> Path:
    """Evaluate one model into ``eval/<name>.json`` (resuming from its items)."""
    out = eval_path(results_dir, info.name)
    if out.is_file():
        log(f"[eval] {info.name}: already evaluated ({out}); delete it to redo")
        return out
    _check_fingerprint(results_dir, info, config)
    is_baseline = info.name == baseline
    base_records = None
    if not is_baseline:
        base_file = items_path(results_dir, baseline, TEXT_MODE, "logprobs")
        if not base_file.is_file():
            raise ResultsError(
                f"{base_file}: the baseline {baseline!r} has not been evaluated in {results_dir}"
            )
    log(f"[eval] {info.name}: starting vLLM on {info.path}")
    engine = Engine(info, config, quantization_flag(info))
    try:
        own = _text_logprobs(engine, results_dir, info, config)
        if not is_baseline:
            base_records = list(read_records(base_file).values())
            base_records.sort(key=lambda r: int(r["id"]))
        ppl, kl = _perplexity_and_kl(own, base_records, config.kl_top_k)
        modes = list(config.modes or engine.family["modes"])
        unknown = [m for m in modes if m not in engine.family["modes"]]
        if unknown:
            raise ValueError(
                f"modes {unknown} not available for {info.name} (family {engine.family['name']!r}: "
                f"{', '.join(engine.family['modes'])})"
            )
        results: dict[str, dict] = {}
        for mode in modes:
            for task in (t for t in config.tasks if t in GENERATIVE):
                results.setdefault(mode, {"tasks": {}})["tasks"][task] = _run_generative(
                    engine, results_dir, info, config, mode, task
                )
        if "hellaswag" in config.tasks:
            results[LOGLIK_MODE] = {"tasks": {"hellaswag": _run_hellaswag(engine, results_dir, info, config)}}
        quantization = engine.quantization
        family = engine.family["name"]
    finally:
        engine.close()
    summary = {
        "schema": EVAL_SCHEMA,
        "model": info.name,
        "path": info.path,
        "baseline": baseline,
        "is_baseline": is_baseline,
        "scheme": info.scheme,
        "weight_bits": info.weight_bits,
        "activation_bits": info.activation_bits,
        "quantization": quantization,
        "family": family,
        "machine": machine_description(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config.describe(),
        "perplexity": ppl,
        "kl": kl,
        "modes": results,
    }
    write_json_atomic(out, summary)
    log(f"[eval] {info.name}: wrote {out}")
    return out


def evaluate(
    models: list[tuple[str, str | None]], results_dir: str | Path, config: EvalConfig, log=print
) -> list[Path]:
    """Evaluate ``models`` [(path, name or None)]; the first is the baseline."""
    limited = [t for t, _ in config.limit] if isinstance(config.limit, tuple) else []
    unknown = [t for t in (*config.tasks, *limited) if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; tasks: {', '.join(ALL_TASKS)}")
    infos = describe_models(models, config.dtype)
    results_dir = Path(results_dir)
    return [evaluate_model(info, results_dir, config, infos[0].name, log) for info in infos]
