"""Use a shipped preset YAML directly with llmcompressor's `oneshot`, with our calibration data.

    .venv/bin/python examples/oneshot_shipped_yaml.py

The YAML files under vllm_ptq_ascend/recipes/yaml/ are plain llmcompressor recipes. A
checkpoint saved this way is plain compressed-tensors (no ptq_ascend marker), so serve it with
`--quantization ptq_ascend` (or `vllm-ptq-ascend quantize`, which adds the marker and a model card).
"""

from vllm_ptq_ascend.env import apply_cpu_defaults, repo_cache_root

apply_cpu_defaults()

import torch  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from vllm_ptq_ascend.assets.embedded import embedded_model_dir  # noqa: E402
from vllm_ptq_ascend.recipes.calibration import CalibrationSpec, build_calibration  # noqa: E402
from vllm_ptq_ascend.recipes.presets import yaml_path  # noqa: E402

base = embedded_model_dir()
tokenizer = AutoTokenizer.from_pretrained(base)
data, summary = build_calibration(base, tokenizer, CalibrationSpec(num_samples=32, max_seq_length=512))
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
recipe = yaml_path("w8a8-smoothquant")
print("recipe:", recipe)
oneshot(model=model, recipe=str(recipe), dataset=data, num_calibration_samples=len(data), max_seq_length=512)
out = repo_cache_root() / "examples" / "smollm2-w8a8-smoothquant-yaml"
model.save_pretrained(out, save_compressed=True)
tokenizer.save_pretrained(out)
print(f"wrote {out}; serve it with: vllm serve {out} --quantization ptq_ascend")
