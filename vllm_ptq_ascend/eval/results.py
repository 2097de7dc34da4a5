"""The results directory shared by ``eval``, ``bench`` and ``report``: layout, schema, safe writes.

Layout of a results directory::

    RESULTS_DIR/
      eval/<model>.json                 one file per model, written by `vllm-ptq-ascend eval`
      bench/<model>.json                one file per model and serving path, by `vllm-ptq-ascend bench`
      items/<model>/<mode>/<task>.jsonl per-item records, appended as items finish (resuming reads them)
      results.json, report.md, plots/   written by `vllm-ptq-ascend report`

``<model>`` is the short name used in every table (``bf16``, ``w4a16-awq``, ``w8a8-dynamic@stock``).

eval/<model>.json (``EVAL_SCHEMA``)::

    {"schema": "vllm-ptq-ascend.eval/1", "model": "w4a16-awq", "path": "/abs/dir",
     "baseline": "bf16", "is_baseline": false,
     "scheme": "w4a16-awq", "weight_bits": 4, "activation_bits": 16,   # 16/16 when unquantized
     "quantization": "ptq_ascend",                                     # vLLM's method, null if none
     "family": "default", "machine": "...", "created": "ISO time",
     "perplexity": {"value": 6.17, "tokens": 3457},                    # on held-out shipped text
     "kl": {"mean": 0.012, "tokens": 3457, "top_k": 20},               # vs the baseline; null for it
     "modes": {"<mode>": {"tasks": {"<task>": TASK}}}}

TASK: ``{"metric": "accuracy"|"pass@1", "accuracy": float, "n": int, "correct": int}`` plus, for
generative tasks (gsm8k, humaneval), ``mean_output_tokens``, ``repetition_rate`` (share of outputs
flagged as looping) and ``unfinished_rate`` (share that hit the token budget).

bench/<model>.json (``BENCH_SCHEMA``)::

    {"schema": "vllm-ptq-ascend.bench/1", "model": "w8a8-dynamic", "path": "/abs/dir",
     "scheme": "w8a8-dynamic", "weight_bits": 8, "activation_bits": 8,
     "quantization": "ptq_ascend", "serving_path": "ptq_ascend"|"stock"|"unquantized",
     "machine": "...", "created": "ISO time",
     "offline": {"prefill_tok_s", "decode_tok_s", "ttft_ms", "tpot_ms", "batch", "prompt_len", "gen_len"},
     "serve": {"ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "output_tok_s", "requests"} | null,
     "memory": {"weights_mib", "kv_cache_mib", "peak_rss_mib", "torch_tensors_mib",  # weights: on disk
                "kv_cache_dtype", "kv_bytes_per_token", "kv_cache_tokens", "traces_4k"},
      # traces_4k: 4096-token sequences the allocated KV cache holds at once
     "linear": {"act_quant_ms", "linear_ms", "act_quant_share"[, "transform_ms", "transform_share"]
                [, "fused_ms", "fused_share"]} | null}
      # null: no dynamic act. quant; transform: FlatQuant; fused: calls that quantize inside the GEMM
      # (their quantization has no time of its own; act_quant_* is null when every layer fuses it)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

EVAL_SCHEMA = "vllm-ptq-ascend.eval/1"
BENCH_SCHEMA = "vllm-ptq-ascend.bench/1"
_UMASK = os.umask(0)
os.umask(_UMASK)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+\-]*$")


class ResultsError(ValueError):
    """A results file that is missing, unreadable or not of the expected schema (names the file)."""


def check_model_name(name: str) -> str:
    """Model names become file names: letters, digits and ``_ . @ + -`` only."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 100:
        raise ValueError(f"model name {name!r}: use letters, digits and '_ . @ + -' (it becomes a file name)")
    return name


def machine_description() -> str:
    """The machine line every eval and bench file carries: the CPU and the flags that choose its kernels."""
    import platform

    from vllm_ptq_ascend.cpu_features import cpu_model, kernel_isa

    return (
        f"{cpu_model()} ({kernel_isa()}), {platform.machine()} {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}"
    )


def write_json_atomic(path: str | Path, data) -> Path:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, schema: str | None = None) -> dict:
    """A results file as a dict; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not a readable JSON results file ({e})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if schema is not None and data.get("schema") != schema:
        raise ResultsError(f"{path}: schema is {data.get('schema')!r}, expected {schema!r}")
    if "model" in data and schema in (EVAL_SCHEMA, BENCH_SCHEMA):
        check_model_name(data["model"])
    return data


def eval_path(results_dir: str | Path, model: str) -> Path:
    return Path(results_dir) / "eval" / f"{check_model_name(model)}.json"


def bench_path(results_dir: str | Path, model: str) -> Path:
    return Path(results_dir) / "bench" / f"{check_model_name(model)}.json"


def items_path(results_dir: str | Path, model: str, mode: str, task: str) -> Path:
    return Path(results_dir) / "items" / check_model_name(model) / mode / f"{task}.jsonl"


def _load_dir(folder: Path, schema: str) -> dict[str, dict]:
    loaded = {}
    for p in sorted(folder.glob("*.json")):
        d = read_json(p, schema)
        if d.get("model") != p.stem:
            name = d.get("model")
            raise ResultsError(f"{p}: holds model {name!r}; the file must be named {name}.json")
        loaded[d["model"]] = d
    return loaded


def load_all(results_dir: str | Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(eval results by model, bench results by model) of a results directory, file order by name."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultsError(f"{root}: no such results directory")
    evals = _load_dir(root / "eval", EVAL_SCHEMA)
    benches = _load_dir(root / "bench", BENCH_SCHEMA)
    if not evals and not benches:
        raise ResultsError(
            f"{root}: no eval/*.json or bench/*.json results (run `vllm-ptq-ascend eval` first)"
        )
    return evals, benches
