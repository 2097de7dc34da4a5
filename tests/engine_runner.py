"""Runs several vLLM engines one after another in one process; prints JSON results.

Used by the end-to-end tests through a subprocess, so a crashing engine cannot
take the test process with it and Python/vLLM start-up is paid once per batch.
Input (stdin): {"jobs": [{"model", "quantization", "dtype", "prompts", "max_tokens", "env",
"tensor_parallel_size"}]} (tensor_parallel_size > 1: vLLM's multiprocess executor, one worker per rank).
Output (last stdout line): {"results": [{"quantization_used", "kv_cache_dtype", "prompt_logprobs",
"output_token_ids"} | {"error"}]}.
"""

from __future__ import annotations

import gc
import json
import sys


def _tensor_parallel(job: dict) -> dict:
    size = job.get("tensor_parallel_size", 1)
    if size == 1:
        return {}
    import os

    # vLLM-CPU binds each worker's threads to its own NUMA node, of which this host has one: one core each;
    # in the job's env, so it is unset again for the next job
    binding = "|".join(str(i % os.cpu_count()) for i in range(size))
    job.setdefault("env", {}).setdefault("VLLM_CPU_OMP_THREADS_BIND", binding)
    return {"tensor_parallel_size": size, "distributed_executor_backend": "mp"}


def run_job(job: dict) -> dict:
    import os

    from vllm import LLM, SamplingParams

    parallel = _tensor_parallel(job)
    os.environ.update(job.get("env", {}))  # e.g. the kernel backend for this job

    llm = LLM(
        job["model"],
        quantization=job.get("quantization"),
        dtype=job.get("dtype", "float32"),
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        **parallel,
    )
    try:
        params = SamplingParams(max_tokens=job.get("max_tokens", 4), temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
        return {
            "quantization_used": llm.llm_engine.vllm_config.model_config.quantization,
            "kv_cache_dtype": llm.llm_engine.vllm_config.cache_config.cache_dtype,
            # logprob of each actual prompt token (the first token has none)
            "prompt_logprobs": [
                [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]
                for o, p in zip(outs, job["prompts"])
            ],
            "output_token_ids": [list(o.outputs[0].token_ids) for o in outs],
        }
    finally:
        del llm
        gc.collect()
        for key in job.get("env", {}):
            os.environ.pop(key, None)


def run_engines(jobs: list[dict], timeout: int = 900) -> list[dict]:
    """Run ``jobs`` in a fresh Python process (see module docstring); one result per job."""
    import subprocess
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=json.dumps({"jobs": jobs}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def main() -> None:
    from vllm_ptq_ascend.env import apply_cpu_defaults

    apply_cpu_defaults()
    jobs = json.loads(sys.stdin.read())["jobs"]
    results = []
    for job in jobs:
        try:
            results.append(run_job(job))
            continue
        except Exception as e:  # reported per job; the test decides
            results.append({"error": f"{type(e).__name__}: {e}"})
        # The failed engine lives on in the exception's traceback, which is freed only here; collect
        # it now, or its shutdown would run during the next job and tear down that job's groups.
        gc.collect()
        # a failed start leaves vLLM's process groups half set up: tear them down
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    print("\n" + json.dumps({"results": results}))


if __name__ == "__main__":
    main()
