"""Calibration data (recipes/calibration/): modes as data, exact mixes, seeds, sources, traces."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from vllm_ptq_ascend.recipes import calibration as C
from vllm_ptq_ascend.recipes.calibration import CalibrationSpec, build_calibration, build_samples, traces

# A Qwen3-style ChatML template: enable_thinking=false adds an empty think block to the generation prompt.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# openPangu-Embedded's template (tokenizer_config.json of openPangu-Embedded-7B-V1.1).
PANGU_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '[unused9]系统：[unused10]' }}{% endif %}{% if message['role'] == 'system' %}"
    "{{ '[unused9]系统：' + message['content'] + '[unused10]' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{'[unused9]助手：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'user' %}{{'[unused9]用户：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}"
)


def _tokenizer(model_dir, template="keep"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if template != "keep":
        tok.chat_template = template
    return tok


def _variant(tiny_model: Path, root: Path, name: str, config_update: dict, template) -> Path:
    """A directory with the tiny model's tokenizer, a chat template and config.json changes (no weights)."""
    out = root / name
    out.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.name.startswith("special_tokens") or f.name == "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(config_update)
    (out / "config.json").write_text(json.dumps(cfg))
    tok = _tokenizer(out, template)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen3_like(tiny_model, tmp_path_factory):
    return _variant(tiny_model, tmp_path_factory.mktemp("q3"), "qwen3-like", {}, QWEN3_TEMPLATE)


@pytest.fixture(scope="module")
def pangu_like(tiny_model, tmp_path_factory):
    cfg = {"model_type": "PanguEmbedded", "architectures": ["PanguEmbeddedForCausalLM"]}
    return _variant(tiny_model, tmp_path_factory.mktemp("pg"), "pangu-like", cfg, PANGU_TEMPLATE)


# ---------------------------------------------------------------- parsing and counts


def test_parse_mode_mix():
    assert C.parse_mode_mix("slow_think:0.5,no_think:0.5") == {"slow_think": 0.5, "no_think": 0.5}
    assert C.parse_mode_mix(" no_think ") == {"no_think": 1.0}
    assert C.parse_mode_mix("a:0.333,b:0.333,c:0.333") == {"a": 0.333, "b": 0.333, "c": 0.333}
    assert C.parse_mode_mix("a:1,b:0") == {"a": 1.0, "b": 0.0}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("slow_think=0.5,no_think=0.5", "not 'mode:weight'"),
        ("slow_think:0.5,no_think", "not 'mode:weight'"),
        ("slow_think:half,no_think:0.5", "not a number"),
        ("slow_think:1.5,no_think:-0.5", "negative"),
        ("slow_think:0.5,no_think:0.4", "sum to 0.9"),
        ("slow_think:0.5,slow_think:0.5", "twice"),
        ("slow think:1", "bad mode name"),
        ("a:nan,b:1", "finite"),
    ],
)
def test_parse_mode_mix_errors(text, fragment):
    with pytest.raises(ValueError, match="modes") as e:
        C.parse_mode_mix(text)
    assert fragment in str(e.value)


def test_mode_counts_exact_largest_remainder():
    assert C.mode_counts({"a": 0.5, "b": 0.5}, 10) == {"a": 5, "b": 5}
    assert C.mode_counts({"a": 0.34, "b": 0.33, "c": 0.33}, 10) == {"a": 4, "b": 3, "c": 3}
    assert C.mode_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 4) == {"a": 2, "b": 1, "c": 1}
    assert C.mode_counts({"a": 0.7, "b": 0.3}, 1) == {"a": 1, "b": 0}
    for n in range(1, 40):
        assert sum(C.mode_counts({"a": 0.25, "b": 0.6, "c": 0.15}, n).values()) == n
    slots = C.mode_assignment({"a": 0.25, "b": 0.75}, 16, seed=3)
    assert Counter(slots) == {"a": 4, "b": 12}
    assert slots == C.mode_assignment({"a": 0.25, "b": 0.75}, 16, seed=3)
    assert slots != C.mode_assignment({"a": 0.25, "b": 0.75}, 16, seed=4)
    assert slots != sorted(slots)  # interleaved, not blocks


# ---------------------------------------------------------------- families


def _family_dir(tmp_path, name, config):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


class _Tok:
    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_family_detection_from_config_and_template(tmp_path):
    modes = C.load_modes()
    assert [f["name"] for f in modes["families"]][-1] == "default"
    pangu = _family_dir(tmp_path, "m1", {"model_type": "PanguEmbedded"})
    assert C.detect_family(pangu, _Tok(None))["name"] == "openpangu_embedded"
    pangu_arch = _family_dir(tmp_path, "m2", {"architectures": ["PanguEmbeddedForCausalLM"]})
    assert C.detect_family(pangu_arch, None)["name"] == "openpangu_embedded"
    qwen3 = _family_dir(tmp_path, "m3", {"model_type": "qwen3"})
    assert C.detect_family(qwen3, _Tok(QWEN3_TEMPLATE))["name"] == "qwen3"
    r1 = _family_dir(tmp_path, "m4", {"model_type": "qwen2"})
    r1_tpl = "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜>"
    assert C.detect_family(r1, _Tok(r1_tpl))["name"] == "deepseek_r1_distill"
    # the same qwen2 config with a plain ChatML template is an ordinary chat model
    assert C.detect_family(r1, _Tok("<|im_start|>"))["name"] == "default"
    qwq = _family_dir(tmp_path, "QwQ-32B", {"model_type": "qwen2"})
    assert C.detect_family(qwq, _Tok("<|im_start|>"))["name"] == "qwq"
    qwq_tpl = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    assert C.detect_family(r1, _Tok(qwq_tpl))["name"] == "qwq"
    fam = C.detect_family(_family_dir(tmp_path, "m5", {"model_type": "llama"}), _Tok("x"))
    assert fam["name"] == "default" and list(fam["modes"]) == ["no_think"]


def test_unknown_mode_for_family_lists_its_modes(tiny_model):
    tok = _tokenizer(tiny_model)
    with pytest.raises(ValueError, match="'slow_think' not available for model family 'default'") as e:
        build_calibration(
            tiny_model, tok, CalibrationSpec(num_samples=4, modes="slow_think:0.5,no_think:0.5")
        )
    assert "its modes are: no_think" in str(e.value)


# ---------------------------------------------------------------- shipped text, modes in the tokens


def test_qwen3_mode_mix_exact_and_templates_in_tokens(qwen3_like):
    tok = _tokenizer(qwen3_like)
    spec = CalibrationSpec(num_samples=12, max_seq_length=2048, modes="slow_think:0.75,no_think:0.25")
    samples, summary = build_samples(qwen3_like, tok, spec)
    assert summary["family"] == "qwen3" and summary["chat_template"] is True
    assert summary["mode_counts"] == {"slow_think": 9, "no_think": 3}
    assert Counter(s.mode for s in samples) == {"slow_think": 9, "no_think": 3}
    assert {s.origin for s in samples} == {"gsm8k", "humaneval", "hellaswag"}
    assert sum(o["samples"] for o in summary["data_origins"].values()) == 12
    empty_think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for s in samples:
        text = tok.decode(s.input_ids)  # what the model will see, from the token ids
        assert text == s.text
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
        if s.mode == "no_think":
            assert empty_think in text and text.count("<think>") == 1
        else:
            assert empty_think not in text and "<|im_start|>assistant\n<think>\n" in text
            think = text.split("<think>\n", 1)[1].split("\n</think>", 1)[0]
            assert think.strip() and text.count("<think>") == 1
            if s.origin == "gsm8k":  # the worked steps are inside the think block
                assert "=" in think and "####" not in think
                assert "\n</think>\n\n#### " in text


def test_pangu_modes_as_user_suffix(pangu_like):
    tok = _tokenizer(pangu_like)
    spec = CalibrationSpec(
        num_samples=10, max_seq_length=4096, modes="slow_think:0.4,auto_think:0.3,no_think:0.3"
    )
    samples, summary = build_samples(pangu_like, tok, spec)
    assert summary["family"] == "openpangu_embedded"
    assert summary["mode_counts"] == {"slow_think": 4, "auto_think": 3, "no_think": 3}
    for s in samples:
        text = tok.decode(s.input_ids)
        assert text.startswith("[unused9]系统：[unused10][unused9]用户：")
        user = text.split("[unused9]用户：", 1)[1].split("[unused10]", 1)[0]
        assistant = text.split("[unused9]助手：", 1)[1]
        if s.mode == "no_think":
            assert user.endswith(" /no_think") and assistant.startswith("[unused16][unused17]")
        elif s.mode == "auto_think":
            assert user.endswith(" /auto_think") and assistant.startswith("[unused16]")
        else:
            assert "/no_think" not in user and "/auto_think" not in user
            assert assistant.startswith("[unused16]") and "[unused17]" in assistant
        assert text.endswith("[unused10]")
    with pytest.raises(ValueError, match="its modes are: slow_think, auto_think, no_think"):
        build_samples(pangu_like, tok, CalibrationSpec(num_samples=2, modes="think:1"))


def test_same_seed_same_dataset_other_seed_other_order(qwen3_like):
    tok = _tokenizer(qwen3_like)
    spec = CalibrationSpec(num_samples=16, max_seq_length=128, modes="slow_think:0.5,no_think:0.5", seed=7)
    ds1, s1 = build_calibration(qwen3_like, tok, spec)
    ds2, s2 = build_calibration(qwen3_like, tok, spec)
    assert ds1["input_ids"] == ds2["input_ids"] and s1 == s2
    ds3, _ = build_calibration(qwen3_like, tok, CalibrationSpec(**{**C.spec_dict(spec), "seed": 8}))
    assert ds3["input_ids"] != ds1["input_ids"]
    assert ds1.column_names == ["input_ids", "attention_mask"]
    assert all(len(x) <= 128 for x in ds1["input_ids"])
    assert s1["num_tokens"] == sum(len(x) for x in ds1["input_ids"]) and s1["truncated_samples"] > 0
    json.dumps(s1)  # model-card ready


def test_dataset_is_taken_as_tokenized_by_llmcompressor(tiny_model):
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets.utils import get_calibration_dataloader

    tok = _tokenizer(tiny_model)
    ds, summary = build_calibration(tiny_model, tok, CalibrationSpec(num_samples=3, max_seq_length=64))
    assert summary["family"] == "default" and summary["mode_counts"] == {"no_think": 3}
    args = DatasetArguments(dataset=ds, max_seq_length=64, num_calibration_samples=3)
    batches = list(get_calibration_dataloader(args, tok))
    assert len(batches) == 3
    assert set(batches[0]) == {"input_ids", "attention_mask"}
    assert sorted(b["input_ids"][0].tolist() for b in batches) == sorted(ds["input_ids"])


def test_tokenizer_without_chat_template_gives_plain_text(tiny_model):
    tok = _tokenizer(tiny_model, None)
    samples, summary = build_samples(tiny_model, tok, CalibrationSpec(num_samples=3))
    assert summary["chat_template"] is False and "plain text" in summary["note"]
    assert all("<|im_start|>" not in s.text for s in samples)
    gsm = [s for s in samples if s.origin == "gsm8k"][0]
    item = {it.item_id: it for it in C.shipped_items("gsm8k")}[gsm.item_id]
    assert gsm.text == f"{item.question}\n{item.solution}" and "####" in item.solution


# ---------------------------------------------------------------- file source and bad input


def test_file_source(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    path = tmp_path / "calib.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        {"text": "Plain calibration text about numbers."},
        {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    samples, summary = build_samples(tiny_model, tok, CalibrationSpec(source=f"file:{path}", num_samples=3))
    texts = sorted(s.text for s in samples)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n" in texts
    assert "Plain calibration text about numbers." in texts
    assert summary["plain_text_samples"] == 1 and summary["data_origins"]["file"]["lines"] == 3
    with pytest.raises(ValueError, match=r"num_samples=4 but only 3 lines of .*calib\.jsonl"):
        build_samples(tiny_model, tok, CalibrationSpec(source=f"file:{path}", num_samples=4))


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"text": "ok"}\n{"text": "ok"\n', "calib.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n\n{"prompt": "x"}\n', "calib.jsonl:3: expected a 'messages' or 'text' key"),
        ('{"messages": [{"role": "user"}]}\n', "calib.jsonl:1: 'messages' must be"),
        ('["text"]\n', "calib.jsonl:1: expected an object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tiny_model, tmp_path, content, fragment):
    path = tmp_path / "calib.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        build_samples(
            tiny_model, _tokenizer(tiny_model), CalibrationSpec(source=f"file:{path}", num_samples=1)
        )
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "spec, exc, fragment",
    [
        (CalibrationSpec(source="wikitext"), ValueError, "source must be 'shipped', 'traces' or 'file:PATH'"),
        (CalibrationSpec(source="file:"), ValueError, "source must be"),
        (
            CalibrationSpec(source="file:/nonexistent/calib.jsonl"),
            FileNotFoundError,
            "/nonexistent/calib.jsonl",
        ),
        (CalibrationSpec(num_samples=0), ValueError, "num_samples must be an integer >= 1"),
        (CalibrationSpec(max_seq_length=4), ValueError, "max_seq_length must be an integer >= 8"),
        (CalibrationSpec(num_samples=1000), ValueError, "num_samples=1000 but only 344 shipped items"),
        (CalibrationSpec(source="traces", max_new_tokens=0), ValueError, "max_new_tokens must be"),
        (CalibrationSpec(modes="no_think:2"), ValueError, "sum to 2"),
    ],
)
def test_bad_input(tiny_model, spec, exc, fragment):
    with pytest.raises(exc) as e:
        build_calibration(tiny_model, _tokenizer(tiny_model), spec)
    assert fragment in str(e.value)


# ---------------------------------------------------------------- self-generated traces


def test_traces_are_the_models_own_output_and_cached(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    spec = CalibrationSpec(source="traces", num_samples=4, max_new_tokens=16, max_seq_length=256, seed=5)
    cache = tmp_path / "cache"
    runs = traces.ENGINE_RUNS
    samples, summary = build_samples(tiny_model, tok, spec, cache)
    assert traces.ENGINE_RUNS == runs + 1
    gen = summary["generation"]
    assert gen["cache"] == "miss" and gen["max_new_tokens"] == 16 and gen["sampling"]["no_think"]
    cache_file = Path(gen["cache_file"])
    assert cache_file.parent == cache and cache_file.suffix == ".jsonl"
    records = [json.loads(x) for x in cache_file.read_text().splitlines()]
    assert len(records) == len(samples) == 4 and gen["generated_tokens"] > 0
    renderer = C.Renderer(tok, C.detect_family(tiny_model, tok))
    for s, r in zip(samples, records):
        assert s.origin in ("gsm8k", "humaneval") and s.mode == "no_think"
        question = {it.item_id: it for it in C.shipped_items(s.origin)}[s.item_id].question
        prompt = renderer.prompt([{"role": "user", "content": question}], "no_think")
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        # the sample is the rendered prompt followed by the model's own continuation
        assert s.input_ids[: s.prompt_tokens] == prompt_ids
        continuation = s.input_ids[s.prompt_tokens :]
        assert continuation == r["output_token_ids"] and 1 <= len(continuation) <= 16
        assert s.text.startswith(prompt) and len(s.text) > len(prompt)
    mtime = cache_file.stat().st_mtime_ns
    ds, summary2 = build_calibration(tiny_model, tok, spec, cache)
    assert summary2["generation"]["cache"] == "hit" and traces.ENGINE_RUNS == runs + 1  # no second engine
    assert ds["input_ids"] == [s.input_ids for s in samples]
    assert cache_file.stat().st_mtime_ns == mtime
    # seeded sampling: a fresh cache with the same seed regenerates the very same traces
    again, _ = build_samples(tiny_model, tok, spec, tmp_path / "cache2")
    assert traces.ENGINE_RUNS == runs + 2
    assert [s.input_ids for s in again] == [s.input_ids for s in samples]


def test_perplexity_texts_are_held_out_of_calibration(tiny_model):
    """The evaluation scores held_out_texts(); no calibration sample may contain them."""
    from transformers import AutoTokenizer

    from vllm_ptq_ascend.assets.shipped_text import HELD_OUT_GSM8K, gsm8k_items

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data, summary = build_calibration(tiny_model, tok, CalibrationSpec(num_samples=344, max_seq_length=2048))
    assert summary["data_origins"]["gsm8k"]["samples"] == 100 - HELD_OUT_GSM8K
    texts = [tok.decode(ids) for ids in data["input_ids"]]
    for item in gsm8k_items()[-HELD_OUT_GSM8K:]:
        assert not any(item["prompt"] in t for t in texts), item["id"]
    assert sum(gsm8k_items()[0]["prompt"] in t for t in texts) == 1  # and the rest are used
