"""Known-answer tests of the evaluation harness's pure metric functions (no vLLM, no device)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from vllm_ptq_ascend.assets.shipped_text import gsm8k_items
from vllm_ptq_ascend.eval.metrics import (
    accuracy_summary,
    answers_match,
    extract_answer,
    hellaswag_choice,
    kl_from_topk,
    longest_repeated_suffix_period,
    looks_collapsed,
    mean_kl,
    normalize_number,
    pass_at_k,
    perplexity,
    repetition_rate,
    retention,
    strip_thinking,
)

# --------------------------------------------------------------------------------------------------
# strip_thinking / extract_answer / normalize_number / answers_match
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, final",
    [
        ("no tags at all, 42", "no tags at all, 42"),
        ("<think>a</think>b", "b"),
        ("<think>a</think>b</think>c", "c"),  # the LAST closing tag
        ("a</think>b", "b"),  # template put <think> in the prompt
        ("[unused16]a[unused17]b", "b"),  # openPangu
        ("<think>a</think>b[unused17]c", "c"),  # last closing tag among both kinds
        ("<think>still thinking 12", ""),
        ("[unused16]still thinking 12", ""),
        ("<think>a</think>b<think>again 5", ""),  # reopened and never closed
    ],
)
def test_strip_thinking(text, final):
    assert strip_thinking(text) == final


@pytest.mark.parametrize(
    "text, answer",
    [
        (r"so $x = \boxed{\frac{1}{2}}$", "0.5"),
        (r"first \boxed{3}, corrected: \boxed{4}", "4"),
        ("work...\n#### 1,234", "1234"),
        ("She pays $18.00", "18"),
        ("The answer is 1,234.50 dollars.", "1234.5"),
        ("The temperature dropped to -7 degrees.", "-7"),
        (r"\boxed{-12}", "-12"),
        ("I cannot solve this.", None),
        ("", None),
        ("<think>it is 5 apples</think>", None),  # number only in the thinking, empty final part
        ("<think>it is 5 apples</think>\n", None),
        ("<think>maybe 5, or 6</think>The answer is 8.", "8"),
        ("[unused16]9 or 8?[unused17]The answer is 7", "7"),
        (r"<think>\boxed{3}</think>so 4", "4"),  # a box while thinking is not the answer
        ("<think>never finished 41", None),
        (r"the total is \boxed{12", "12"),  # unterminated box: last number
        (r"\boxed{5} then \boxed{12", "5"),  # the last COMPLETE box
        (r"\boxed{1{,}000}", "1000"),
        (r"\boxed{\$1{,}000.50}", "1000.5"),
        (r"\boxed{18 \text{ dollars}}", "18"),
        (r"\boxed{\dfrac{3}{4}}", "0.75"),
        ("#### 72\nsome trailing 5", "72"),  # "####" beats the last number
        (r"#### 9 but \boxed{10}", "10"),  # a box beats "####"
        ("20-10 remain", "10"),  # subtraction is not a negative sign
        ("x = -3.5.", "-3.5"),
        ("<<5*2=10>>10 and then 25%", "25"),
        ("The total is 1{,}000 dollars.", "1000"),
        ("She had 12,345,678.9 coins", "12345678.9"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_non_numeric_box_is_returned_verbatim():
    assert extract_answer(r"\boxed{\text{yes}}") == r"\text{yes}"
    assert answers_match(extract_answer(r"\boxed{B}"), "B")


@pytest.mark.parametrize(
    "s, normal",
    [
        ("1,000", "1000"),
        ("18.00", "18"),
        ("18.", "18"),
        ("-3.5", "-3.5"),
        (r"\frac{1}{2}", "0.5"),
        (r"-\frac{1}{4}", "-0.25"),
        ("1/2", "0.5"),
        ("1/3", repr(1 / 3)),
        ("$5", "5"),
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("5%", "5"),
        ("1{,}000", "1000"),
        ("0.125", "0.125"),
        ("-0", "0"),
        (" 42 ", "42"),
        ("abc", None),
        ("", None),
        ("1/0", None),
        ("12 apples", None),
        ("1.2.3", None),
    ],
)
def test_normalize_number(s, normal):
    assert normalize_number(s) == normal


@pytest.mark.parametrize(
    "predicted, expected, match",
    [
        ("18", "18.0", True),
        ("18.0", "18", True),
        ("18", "180", False),
        ("0.5", r"\frac{1}{2}", True),
        (r"\frac{1}{3}", "0.3333333", True),  # within 1e-6
        (r"\frac{1}{3}", "0.333", False),
        ("1,000", "1000", True),
        ("-5", "5", False),
        (None, "5", False),
        ("yes", " yes ", True),
        ("yes", "no", False),
    ],
)
def test_answers_match(predicted, expected, match):
    assert answers_match(predicted, expected) is match


def test_every_shipped_gsm8k_reference_answer_is_graded_correct():
    items = gsm8k_items()
    assert len(items) == 100
    wrong = [
        (it["id"], extract_answer(it["upstream_answer"]), it["expected"])
        for it in items
        if not answers_match(extract_answer(it["upstream_answer"]), it["expected"])
    ]
    assert wrong == []
    # The shipped set includes thousands separators after "####": the extraction must handle them.
    assert any("," in it["upstream_answer"].rsplit("####", 1)[1] for it in items)


def test_shipped_gsm8k_answers_are_not_matched_against_the_wrong_item():
    items = gsm8k_items()
    shifted = [
        answers_match(extract_answer(a["upstream_answer"]), b["expected"]) for a, b in zip(items, items[1:])
    ]
    assert sum(shifted) < len(shifted) // 2


# --------------------------------------------------------------------------------------------------
# repetition / collapse
# --------------------------------------------------------------------------------------------------


def test_repetition_rate_known_values():
    assert repetition_rate(list(range(100))) == 0.0
    assert repetition_rate([1, 2, 3]) == 0.0  # fewer than n tokens
    assert repetition_rate([]) == 0.0
    # period-2 loop of 100 tokens: 97 4-grams, only 2 distinct ((1,2,1,2) and (2,1,2,1)).
    assert repetition_rate([1, 2] * 50) == pytest.approx(1 - 2 / 97, abs=1e-15)
    # n=1: 100 tokens, 2 distinct.
    assert repetition_rate([1, 2] * 50, n=1) == pytest.approx(1 - 2 / 100, abs=1e-15)
    # One repeated 4-gram among 5: [1,2,3,4,1,2,3,4] has 5 4-grams, 4 distinct.
    assert repetition_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.2, abs=1e-15)
    with pytest.raises(ValueError):
        repetition_rate([1, 2, 3], n=0)


def test_longest_repeated_suffix_period():
    assert longest_repeated_suffix_period(list(range(50))) is None
    assert longest_repeated_suffix_period([9, 8] + [1, 2, 3] * 3) == 3
    assert longest_repeated_suffix_period([1, 2, 3] * 2) is None  # only twice
    assert longest_repeated_suffix_period([5, 7, 7, 7]) == 1
    assert longest_repeated_suffix_period([4, 5] * 10) == 2  # smallest period, not 4
    assert longest_repeated_suffix_period([]) is None


def test_looks_collapsed():
    rng = random.Random(0)
    diverse = rng.sample(range(100_000), 2000)
    loop = [11, 12, 13, 14, 15] * 40
    assert looks_collapsed(loop, finished=False)
    assert not looks_collapsed(diverse, finished=False)  # long but not looping: just unfinished
    assert not looks_collapsed(diverse, finished=True)
    assert not looks_collapsed([1, 2] * 8, finished=False)  # 16 tokens: too short to judge
    assert not looks_collapsed([7] * 31, finished=False)
    assert looks_collapsed([7] * 32, finished=False)
    # A loop that starts late: the global rate stays low, the repeating tail gives it away.
    late = diverse + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 6
    assert repetition_rate(late) < 0.5
    assert looks_collapsed(late, finished=False)
    assert not looks_collapsed(late, finished=True)  # it stopped on its own: not a running loop
    # ... but only a long enough tail: three repeats of one token at the end are not a loop.
    assert not looks_collapsed(diverse + [3, 3, 3], finished=False)
    # Thoroughly repetitive output is flagged even if the model emitted EOS eventually.
    assert looks_collapsed(loop, finished=True)
    assert not looks_collapsed(loop, finished=True, threshold=0.99)


# --------------------------------------------------------------------------------------------------
# pass@k / accuracy
# --------------------------------------------------------------------------------------------------


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_special_values():
    for n in (1, 5, 200):
        for k in (1, n):
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0
    for n, c in ((10, 3), (200, 37), (7, 7), (1000, 1)):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
    # Large n stays finite and in range (the binomials themselves would be astronomically large).
    assert 0.0 < pass_at_k(10_000, 5, 100) < 1.0


@pytest.mark.parametrize("args", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1), (5.0, 2, 1)])
def test_pass_at_k_bad_arguments(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_accuracy_summary_wilson_interval():
    correct = [True] * 7 + [False] * 13
    s = accuracy_summary(correct)
    assert s["accuracy"] == pytest.approx(0.35)
    assert s["n"] == 20 and s["correct"] == 7
    # Independent closed form: (c + z^2/2)/(n + z^2) +- z/(n + z^2) * sqrt(c(n - c)/n + z^2/4).
    z, n, c = 1.959963984540054, 20, 7
    center = (c + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(c * (n - c) / n + z * z / 4)
    lo, hi = s["ci95"]
    assert lo == pytest.approx(center - half, abs=1e-12)
    assert hi == pytest.approx(center + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.1812, 0.5671)  # published value for 7/20
    assert lo < s["accuracy"] < hi


def test_accuracy_summary_edges():
    all_right = accuracy_summary([True] * 10)
    assert all_right["accuracy"] == 1.0
    assert all_right["ci95"][1] == pytest.approx(1.0) and 0.6 < all_right["ci95"][0] < 0.8
    none_right = accuracy_summary([False] * 10)
    assert none_right["ci95"][0] == pytest.approx(0.0, abs=1e-15) and none_right["ci95"][1] < 0.4
    with pytest.raises(ValueError):
        accuracy_summary([])


# --------------------------------------------------------------------------------------------------
# KL from top-k logprobs
# --------------------------------------------------------------------------------------------------


def _log_softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    lse = m + math.log(math.fsum(math.exp(x - m) for x in logits))
    return [x - lse for x in logits]


def _random_logprobs(seed: int, vocab: int = 50, scale: float = 2.0) -> list[float]:
    rng = random.Random(seed)
    return _log_softmax([rng.gauss(0.0, scale) for _ in range(vocab)])


def _topk(logprobs: list[float], k: int) -> dict[int, float]:
    order = sorted(range(len(logprobs)), key=lambda i: -logprobs[i])[:k]
    return {i: logprobs[i] for i in order}


def _exact_kl(p_log: list[float], q_log: list[float]) -> float:
    return math.fsum(math.exp(a) * (a - b) for a, b in zip(p_log, q_log))


def test_kl_identical_is_exactly_zero():
    lp = _random_logprobs(1)
    for k in (1, 5, 50):
        assert kl_from_topk(_topk(lp, k), _topk(lp, k)) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_kl_full_support_equals_exact_kl(seed):
    p, q = _random_logprobs(2 * seed), _random_logprobs(2 * seed + 1)
    exact = _exact_kl(p, q)
    assert exact > 0.1
    assert kl_from_topk(_topk(p, 50), _topk(q, 50)) == pytest.approx(exact, abs=1e-9)
    assert kl_from_topk(_topk(q, 50), _topk(p, 50)) == pytest.approx(_exact_kl(q, p), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_kl_truncated_is_finite_and_nonnegative(seed):
    p, q = _random_logprobs(2 * seed), _random_logprobs(2 * seed + 1)
    est = kl_from_topk(_topk(p, 5), _topk(q, 5))
    assert math.isfinite(est) and est >= 0.0


def test_kl_truncated_detects_very_different_distributions():
    # P puts its mass on tokens 0..4, Q on tokens 45..49: the top-5 sets are disjoint.
    p = _log_softmax([5.0 if i < 5 else 0.0 for i in range(50)])
    q = _log_softmax([5.0 if i >= 45 else 0.0 for i in range(50)])
    est = kl_from_topk(_topk(p, 5), _topk(q, 5))
    assert math.isfinite(est) and est > 0.5
    # Nearby distributions give a much smaller estimate than far-apart ones.
    near = _log_softmax([5.0 if i < 5 else 0.0 for i in range(49)] + [0.1])
    assert kl_from_topk(_topk(p, 5), _topk(near, 5)) < 0.1 * est


def test_kl_tail_rule_by_hand():
    # P lists {0: .6, 1: .3} (rest .1), Q lists {0: .6, 2: .3} (rest .1). Each side's missing token gets
    # min(.3, .1 / 2) = .05 and its rest bucket keeps .05:
    #   P = [.6, .3, .05, .05], Q = [.6, .05, .3, .05]  ->  KL = .3 ln(.3/.05) + .05 ln(.05/.3) = .25 ln 6
    base = {0: math.log(0.6), 1: math.log(0.3)}
    other = {0: math.log(0.6), 2: math.log(0.3)}
    assert kl_from_topk(base, other) == pytest.approx(0.25 * math.log(6), abs=1e-12)
    # The smallest listed probability caps a missing token's estimate: Q lists {0: .5, 2: .02}
    # (rest .48); token 1 gets min(.02, .48/2) = .02 and Q's rest is .46.
    other2 = {0: math.log(0.5), 2: math.log(0.02)}
    q1, q_rest = 0.02, 0.46
    p2 = min(0.3, 0.1 / 2)  # P's estimate for token 2
    p_rest = 0.1 - p2
    expected = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / q1) + p2 * math.log(p2 / 0.02)
    expected += p_rest * math.log(p_rest / q_rest)
    assert kl_from_topk(base, other2) == pytest.approx(expected, abs=1e-12)


def test_kl_rejects_invalid_inputs():
    with pytest.raises(ValueError):
        kl_from_topk({0: math.log(0.7), 1: math.log(0.4)}, {0: 0.0})  # sums to 1.1
    with pytest.raises(ValueError):
        kl_from_topk({0: 0.0}, {0: math.log(0.5), 1: math.log(0.5 + 2e-4)})
    with pytest.raises(ValueError):
        kl_from_topk({0: float("nan")}, {0: 0.0})
    with pytest.raises(ValueError):
        kl_from_topk({}, {0: 0.0})
    # Rounding slightly above 1 is tolerated: that side is renormalised to sum to 1.
    assert kl_from_topk({0: math.log(0.5), 1: math.log(0.50005)}, {0: 0.0}) >= 0.0
    z = 0.6 + 0.40005
    expected = 0.5 * math.log(0.5 / (0.6 / z)) + 0.5 * math.log(0.5 / (0.40005 / z))
    got = kl_from_topk({0: math.log(0.5), 1: math.log(0.5)}, {0: math.log(0.6), 1: math.log(0.40005)})
    assert got == pytest.approx(expected, abs=1e-9)


def test_mean_kl():
    p = [_topk(_random_logprobs(s), 50) for s in range(3)]
    q = [_topk(_random_logprobs(s + 10), 50) for s in range(3)]
    expected = sum(kl_from_topk(a, b) for a, b in zip(p, q)) / 3
    assert mean_kl(p, q) == pytest.approx(expected, abs=1e-15)
    assert mean_kl(p, p) == 0.0
    with pytest.raises(ValueError, match=r"3.*2"):
        mean_kl(p, q[:2])
    with pytest.raises(ValueError):
        mean_kl([], [])


# --------------------------------------------------------------------------------------------------
# perplexity / retention / hellaswag
# --------------------------------------------------------------------------------------------------


def test_perplexity_of_uniform_distribution_is_vocab_size():
    for vocab in (2, 50, 32_000):
        assert perplexity([math.log(1 / vocab)] * 37) == pytest.approx(vocab, rel=1e-12)
    assert perplexity([0.0, 0.0]) == 1.0
    # exp(-mean): logprobs log(1/2) and log(1/8) -> geometric mean 1/4 -> perplexity 4.
    assert perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("bad", [[], [float("nan")], [-1.0, float("-inf")], [float("inf")]])
def test_perplexity_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        perplexity(bad)


def test_retention():
    assert retention(0.45, 0.5) == pytest.approx(0.9)
    assert retention(0.6, 0.5) == pytest.approx(1.2)
    assert retention(0.3, 0.0) is None


def test_hellaswag_choice_normalisation_changes_winner():
    endings = [
        [-1.0, -1.0, -1.0, -1.0],  # sum -4.0, mean -1.0
        [-1.5, -1.5],  # sum -3.0, mean -1.5
        [-2.0, -2.5],  # sum -4.5, mean -2.25
    ]
    assert hellaswag_choice(endings) == 0  # "tokens" (default)
    assert hellaswag_choice(endings, normalize="tokens") == 0
    assert hellaswag_choice(endings, normalize="none") == 1
    # By characters: -4/8 = -0.5, -3/4 = -0.75, -4.5/30 = -0.15 -> ending 2.
    texts = [" abcdefg", " abc", " " + "x" * 29]
    assert hellaswag_choice(endings, normalize="chars", ending_texts=texts) == 2


def test_hellaswag_choice_ties_and_errors():
    assert hellaswag_choice([[-1.0], [-0.5, -1.5], [-1.0]]) == 0  # all mean -1.0
    assert hellaswag_choice([[-2.0], [-1.0], [-1.0]], normalize="none") == 1
    with pytest.raises(ValueError):
        hellaswag_choice([])
    with pytest.raises(ValueError):
        hellaswag_choice([[-1.0], []])
    with pytest.raises(ValueError):
        hellaswag_choice([[-1.0]], normalize="bytes")
    with pytest.raises(ValueError):
        hellaswag_choice([[-1.0], [-2.0]], normalize="chars")  # no texts
    with pytest.raises(ValueError):
        hellaswag_choice([[-1.0], [-2.0]], normalize="chars", ending_texts=["a"])
