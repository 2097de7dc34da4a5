"""`vllm-ptq-ascend` command line: quantize a model, run the demo.

Evaluation, benchmarking and inspection subcommands arrive with their issues.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _quantize(args: argparse.Namespace) -> int:
    from vllm_ptq_ascend.recipes.presets import PRESETS
    from vllm_ptq_ascend.recipes.quantize import quantize

    if args.recipe not in PRESETS:
        print(
            f"error: unknown recipe {args.recipe!r}; available: {', '.join(sorted(PRESETS))}", file=sys.stderr
        )
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: {args.model}: not a model directory (no config.json)", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; add --overwrite to replace it", file=sys.stderr)
        return 2
    options = {}
    if args.ignore is not None:
        options["ignore"] = args.ignore
    quantize(args.model, out, args.recipe, overwrite=args.overwrite, **options)
    print(f"wrote {out} (serve it with: vllm serve {out})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vllm_ptq_ascend import demo

    return demo.main() or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-ptq-ascend", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a Hugging Face model directory with a preset recipe")
    q.add_argument("model", help="model directory (config.json + safetensors)")
    q.add_argument("--recipe", default="w8a8-dynamic", help="preset name (default: w8a8-dynamic)")
    q.add_argument("--out", required=True, help="output directory; written atomically")
    q.add_argument("--ignore", nargs="*", help="layers to keep unquantized (default: lm_head)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.set_defaults(func=_quantize)
    d = sub.add_parser("demo", help="quantize the embedded SmolLM2-135M, serve it, compare with bf16")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from vllm_ptq_ascend.env import apply_cpu_defaults

    apply_cpu_defaults()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
