"""Tiny models with random weights and a locally trained tokenizer: a Llama, and one per model
family of ``recipes/families.py`` (``build_tiny_model``).

Tests, examples and CI need a real model directory that vLLM, transformers and
llmcompressor all load, without downloading anything. Shapes are multiples of 32
so vLLM-CPU's own int8 and WNA16 kernels accept every layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_ptq_ascend.assets.shipped_text import reasoning_texts

# A minimal ChatML template, so /v1/chat/completions works against the tiny model.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on the shipped GSM8K text; deterministic for a given size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(reasoning_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a random-weight LlamaForCausalLM + tokenizer to ``out_dir`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so logits are peaked enough for logprob comparisons to mean something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    )
    return out


# the families tiny models are built for (recipes/families.py)
TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "openpangu_embedded", "gemma2")


def _family_config(family: str, common: dict):
    """transformers config of a tiny model of ``family``, and the architectures config.json names."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    head_dim = common["hidden_size"] // common["num_attention_heads"]
    if family == "llama":
        return LlamaConfig(**common), None
    if family == "qwen2":  # q/k/v biases are built in
        return Qwen2Config(**common), None
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim, attention_bias=False), None
    if family == "mistral":
        return MistralConfig(**common, head_dim=head_dim, sliding_window=None), None
    if family == "openpangu_embedded":
        # transformers 5.17 has no openPangu-Embedded; its remote code is transformers' Llama with
        # bias=True on q/k/v/o (recipes/families.py). So transformers (and llmcompressor) load this
        # model as Llama (model_type "llama", attention_bias), and vLLM serves it with its own
        # PanguEmbeddedForCausalLM (model_executor/models/openpangu.py), picked by `architectures`.
        config = LlamaConfig(**common, attention_bias=True, bias=True, rope_theta=16000000.0)
        return config, ["PanguEmbeddedForCausalLM"]
    if family == "gemma2":
        # (1 + w) RMSNorms, pre/post feed-forward norms, embeddings x sqrt(hidden), tied lm_head,
        # attention and final logit soft-capping, and every other layer sliding-window attention
        # with a window shorter than the tests' prompts
        return Gemma2Config(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=32,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
        ), None
    raise ValueError(f"no tiny model for family {family!r}; families: {', '.join(TINY_FAMILIES)}")


def build_tiny_model(
    family: str,
    out_dir: str | Path,
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a random-weight model of ``family`` (one of TINY_FAMILIES) + tokenizer to ``out_dir``.

    Every 2-D weight is drawn as in ``build_tiny_llama``; norm weights and biases are random too
    (x*w norms around 1, Gemma's (1 + w) ones around 0), so that a fold that gets a norm's
    parametrisation or a bias wrong changes the model's function visibly.
    """
    if family == "llama":
        return build_tiny_llama(
            out_dir,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            vocab_size=vocab_size,
            seed=seed,
            dtype=dtype,
        )
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_ptq_ascend.recipes.families import family_of

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family != "gemma2":
        common["tie_word_embeddings"] = False
    config, architectures = _family_config(family, common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    offset = family_of(config).norm_offset
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("norm.weight"):
                p.normal_(1.0 - offset, 0.2)  # effective scale around 1
            else:  # biases
                p.normal_(0.0, 0.05)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if architectures:
        set_architectures(out, architectures)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    )
    return out


def set_architectures(model_dir: str | Path, architectures: list[str]) -> None:
    """Name the model class vLLM is to serve ``model_dir`` with. transformers' save_pretrained writes
    the class it ran (LlamaForCausalLM for the tiny openPangu-Embedded), so a checkpoint quantized
    from that model needs its architectures restored, as the real model's remote class would keep them."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = list(architectures)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
