"""Small measurements through a vLLM ``LLM``: perplexity, greedy answers, throughput, memory.

The full evaluation harness (per CoT mode, GSM8K/HellaSwag/HumanEval, reports)
builds on these.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass


def perplexity_from_logprobs(token_logprobs: list[list[float]]) -> float:
    """exp(mean negative log-likelihood) over every scored token of every text."""
    flat = [lp for text in token_logprobs for lp in text]
    if not flat:
        raise ValueError("no scored tokens: every text needs at least two tokens")
    return math.exp(-sum(flat) / len(flat))


def prompt_token_logprobs(llm, texts: list[str], max_tokens_per_text: int = 256) -> list[list[float]]:
    """log p(token_i | tokens_<i) for i >= 1 of each text (truncated), from vLLM's prompt_logprobs."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok(t)["input_ids"][:max_tokens_per_text]} for t in texts]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for out, p in zip(outs, prompts):
        ids = p["prompt_token_ids"]
        result.append([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    return result


def perplexity(llm, texts: list[str], max_tokens_per_text: int = 256) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of ``texts`` under ``llm``."""
    lps = prompt_token_logprobs(llm, texts, max_tokens_per_text)
    return perplexity_from_logprobs(lps), sum(len(x) for x in lps)


def generate_answers(llm, questions: list[str], max_tokens: int = 96) -> list[str]:
    """Greedy chat answers (the tokenizer's chat template is applied by vLLM)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    convs = [[{"role": "user", "content": q}] for q in questions]
    outs = llm.chat(convs, params, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs]


@dataclass
class Throughput:
    prefill_tok_s: float
    decode_tok_s: float
    prompt_tokens: int
    generated_tokens: int
    rounds: int = 1
    #: (slowest - fastest) / median over the rounds: this run's own noise band
    prefill_spread: float = 0.0
    decode_spread: float = 0.0


#: measured rounds per throughput(): one round of a 2-core VM's prefill (about 0.5 s) moved by 10-15%
#: between two runs of the same checkpoint (2026-12-06), so the rates are medians of several
THROUGHPUT_ROUNDS = 3


def throughput(
    llm, n_prompts: int = 8, prompt_len: int = 256, gen_len: int = 64, rounds: int = THROUGHPUT_ROUNDS
) -> Throughput:
    """Offline prefill and decode rates for a batch of ``n_prompts`` synthetic prompts.

    Prefill: a batch generating one token each, prompt tokens / wall time.
    Decode: the same batch generating ``gen_len`` tokens (ignore_eos); the prefill
    time just measured is subtracted, and the tokens after the first are divided by
    what remains. Both calls are first run once, unmeasured, at full size (the
    first call of a shape pays for allocations and kernel selection). Each rate is the median of
    ``rounds`` measured rounds, and its spread over them is returned beside it.

    The engine must run without prefix caching (``LLM(..., enable_prefix_caching=False)``): with it,
    every measured prompt was cached by the warm-up, and "prefill" times a cache hit.
    """
    from vllm import SamplingParams

    if llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "throughput() needs an engine without prefix caching (LLM(..., enable_prefix_caching=False)): "
            "its warm-up would cache the measured prompts, and prefill would time a cache hit"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")

    vocab = llm.get_tokenizer().vocab_size
    prompts = [
        {"prompt_token_ids": [(7919 * (i + 1) * (j + 3)) % (vocab - 10) + 5 for j in range(prompt_len)]}
        for i in range(n_prompts)
    ]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, one, use_tqdm=False)  # warm-up, same shapes as measured
    llm.generate(prompts, many, use_tqdm=False)
    prefill_rates, decode_rates = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, many, use_tqdm=False)
        total_s = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        prefill_rates.append(n_prompts * prompt_len / prefill_s)
        decode_rates.append((generated - n_prompts) / max(total_s - prefill_s, 1e-9))
    return Throughput(
        prefill_tok_s=statistics.median(prefill_rates),
        decode_tok_s=statistics.median(decode_rates),
        prompt_tokens=n_prompts * prompt_len,
        generated_tokens=generated,
        rounds=rounds,
        prefill_spread=_spread(prefill_rates),
        decode_spread=_spread(decode_rates),
    )


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
