"""`vllm-ptq-ascend` command line: quantize a model, list the recipes, run the demo.

Evaluation, benchmarking and inspection subcommands arrive with their issues.
"""

from __future__ import annotations

import argparse
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
}
CALIB_FLAGS = ("calib", "calib_samples", "calib_seq_len", "calib_modes", "calib_max_new_tokens", "seed")


def _quantize(args: argparse.Namespace) -> int:
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
    if preset.needs_calibration:
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
        raise UsageError(f"recipe {args.recipe!r} uses no calibration data; drop {flags}")

    from vllm_ptq_ascend.recipes.quantize import quantize

    try:
        quantize(args.model, out, args.recipe, calibration=calibration, overwrite=args.overwrite, **options)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out} (serve it with: vllm serve {out})")
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


_UNSET = object()  # a flag the user did not give


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
    c = q.add_argument_group("calibration data (presets that calibrate)")
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
    q.set_defaults(func=_quantize)
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
