"""W4A16 GPTQ from Python, with act-order, then offline generation through vLLM.

    .venv/bin/python examples/w4a16_gptq_python.py

Also shows `w4a16-rtn`, the calibration-free baseline, for comparison.
"""

from vllm_ptq_ascend.env import apply_cpu_defaults, repo_cache_root

apply_cpu_defaults()

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_ptq_ascend.assets.embedded import embedded_model_dir  # noqa: E402
from vllm_ptq_ascend.recipes.calibration import CalibrationSpec  # noqa: E402
from vllm_ptq_ascend.recipes.quantize import quantize  # noqa: E402

root = repo_cache_root() / "examples"
gptq = quantize(
    embedded_model_dir(),
    root / "smollm2-w4a16-gptq",
    "w4a16-gptq",
    calibration=CalibrationSpec(num_samples=64, max_seq_length=512, seed=0),
    group_size=64,  # SmolLM2's hidden size 576 is not a multiple of 128
    actorder="weight",
    overwrite=True,
)
rtn = quantize(embedded_model_dir(), root / "smollm2-w4a16-rtn", "w4a16-rtn", group_size=64, overwrite=True)
question = [{"role": "user", "content": "What is 12 times 7? Think step by step."}]
for ckpt in (gptq, rtn):
    llm = LLM(str(ckpt), max_model_len=1024, enforce_eager=True)  # ptq_ascend detected from config.json
    print(
        ckpt.name, "->", llm.chat(question, SamplingParams(max_tokens=64, temperature=0))[0].outputs[0].text
    )
    del llm
