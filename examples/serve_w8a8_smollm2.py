"""Quantize the embedded SmolLM2-135M to W8A8 and generate with it through vLLM.

    .venv/bin/python examples/serve_w8a8_smollm2.py

The same checkpoint serves over HTTP with `vllm serve .cache/examples/smollm2-w8a8`
(ptq_ascend is detected from its config.json).
"""

from vllm_ptq_ascend.env import apply_cpu_defaults, repo_cache_root

apply_cpu_defaults()

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_ptq_ascend.assets.embedded import embedded_model_dir  # noqa: E402
from vllm_ptq_ascend.recipes.quantize import quantize  # noqa: E402

out = repo_cache_root() / "examples" / "smollm2-w8a8"
if not (out / "config.json").is_file():
    quantize(embedded_model_dir(), out, "w8a8-dynamic")

llm = LLM(str(out), max_model_len=1024, enforce_eager=True)  # no flag: detected
print("served by:", llm.llm_engine.vllm_config.model_config.quantization)
chat = [
    {"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in total?"}
]
print(llm.chat(chat, SamplingParams(max_tokens=80, temperature=0))[0].outputs[0].text)
