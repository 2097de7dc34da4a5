"""Pure metric functions of the evaluation harness: answer extraction, collapse detection, pass@k,
confidence intervals, top-k KL, perplexity and HellaSwag scoring.

Everything here is plain Python + ``math`` so it can be unit-tested exactly, without vLLM or a device:
the harness collects raw outputs (texts, token ids, logprobs) and these functions turn them into numbers.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext
from fractions import Fraction

__all__ = [
    "strip_thinking",
    "extract_answer",
    "normalize_number",
    "answers_match",
    "repetition_rate",
    "longest_repeated_suffix_period",
    "looks_collapsed",
    "pass_at_k",
    "accuracy_summary",
    "kl_from_topk",
    "mean_kl",
    "perplexity",
    "retention",
    "hellaswag_choice",
]

# --------------------------------------------------------------------------------------------------
# Reasoning replies and final answers
# --------------------------------------------------------------------------------------------------

# Closing / opening thinking tags: the standard ``<think>`` pair and openPangu's
# ``[unused16]`` / ``[unused17]``.
THINK_CLOSE_TAGS = ("</think>", "[unused17]")
THINK_OPEN_TAGS = ("<think>", "[unused16]")


def strip_thinking(text: str) -> str:
    """The final-answer part of a reasoning reply: the text after the last closing thinking tag.

    Numbers written while thinking must not be graded, so only what follows the last ``</think>`` /
    ``[unused17]`` counts. A reply with an opening tag and no closing tag after it never finished
    thinking (typically it hit the token budget): it has no final answer, so ``""``. A reply without any
    tag (a non-reasoning model, or a chat template that hides the tags) is returned unchanged.
    """
    close_end = max((text.rfind(tag) + len(tag) for tag in THINK_CLOSE_TAGS if tag in text), default=-1)
    open_start = max((text.rfind(tag) for tag in THINK_OPEN_TAGS), default=-1)
    if close_end >= 0 and open_start < close_end:
        return text[close_end:]
    if open_start >= 0:  # thinking opened (again) and was never closed
        return ""
    return text


# A number as written in model answers: optional minus (not when it is a subtraction, i.e. preceded by a
# word character or a closing bracket), optional "$", thousands separators "," or LaTeX "{,}", decimals.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])(?P<sign>[-\u2212]))?"
    r"\\?\$?"
    r"(?<![\d.])"
    r"(?P<body>(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?!\d)"
)
_PLAIN_NUMBER_RE = re.compile(r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d*)?|\.\d+")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")
_SLASH_RE = re.compile(r"([^/]+)/([^/]+)")
_BOXED = "\\boxed"


def _parse_plain(s: str) -> Fraction | None:
    """Exact value of an unsigned decimal with optional thousands separators, else None."""
    s = s.strip()
    if not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    return Fraction(Decimal(s.replace("{,}", "").replace(",", "")))


def _parse_number(s: str) -> Fraction | None:
    """Exact value of a numeric answer string (see ``normalize_number``), else None."""
    s = s.strip()
    s = re.sub(r"\\[!,;: ]", "", s)  # LaTeX spacing commands
    s = s.replace("\\$", "$").replace("\\%", "%").rstrip(".").strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    negative = False
    for _ in range(2):  # "-$5" and "$-5"
        s = s.strip()
        if s[:1] in ("-", "\u2212", "+"):
            negative ^= s[0] != "+"
            s = s[1:]
        elif s.startswith("$"):
            s = s[1:]
    s = s.strip()
    if not s:
        return None
    value: Fraction | None
    m = _FRAC_RE.fullmatch(s) or _SLASH_RE.fullmatch(s)
    if m:
        num, den = _parse_plain(m.group(1)), _parse_plain(m.group(2))
        if num is None or den is None or den == 0:
            return None
        value = num / den
    else:
        value = _parse_plain(s)
    if value is None:
        return None
    return -value if negative else value


def _format_number(value: Fraction) -> str:
    """Canonical string: integers without decimals, terminating decimals exactly, others as float repr."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # non-terminating (1/3): the float's shortest repr is as good as any
        return repr(float(value))
    with localcontext() as ctx:
        ctx.prec = 100
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".")


def normalize_number(s: str) -> str | None:
    """A numeric answer in one canonical form, so "1,000", "1000.00" and "$1{,}000" compare equal.

    Accepts an optional sign, "$", thousands separators ("," or "{,}"), decimals, a trailing "%"
    (dropped: GSM8K answers are plain numbers), ``\\frac{a}{b}`` / ``\\dfrac`` and ``a/b``.
    None if ``s`` is not a number.
    """
    value = _parse_number(s)
    return None if value is None else _format_number(value)


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (braces balanced, so nested LaTeX survives)."""
    found = None
    start = text.find(_BOXED)
    while start >= 0:
        i = start + len(_BOXED)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0 and j < len(text):  # an unterminated box (reply cut off) is not an answer
                content = text[i + 1 : j].strip()
                if content:
                    found = content
        start = text.find(_BOXED, start + 1)
    return found


def _numbers(text: str) -> list[str]:
    return [(m.group("sign") and "-" or "") + m.group("body") for m in _NUMBER_RE.finditer(text)]


def extract_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style reply, normalised; None when the reply gives none.

    Looked for in ``strip_thinking(text)`` (numbers met while thinking are not answers), in order of how
    explicit the model was: the last complete ``\\boxed{...}``, else the number after the last "####"
    (GSM8K's own format), else the last number in the text.
    """
    text = strip_thinking(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        normal = normalize_number(boxed)
        if normal is not None:
            return normal
        inner = _numbers(boxed)
        if len(inner) == 1:  # "\boxed{18 \text{ dollars}}"
            return normalize_number(inner[0])
        return boxed  # not numeric: graded by string equality
    if "####" in text:
        after = _numbers(text.rsplit("####", 1)[1])
        if after:
            return normalize_number(after[0])
    numbers = _numbers(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(predicted: str | None, expected: str) -> bool:
    """Whether a predicted answer is the expected one: numerically (abs. tol. 1e-6) if both are numbers,
    so "18.0" matches "18" and "\\frac{1}{2}" matches "0.5"; otherwise exact stripped string equality."""
    if predicted is None:
        return False
    a, b = _parse_number(predicted), _parse_number(expected)
    if a is not None and b is not None:
        return abs(a - b) <= Fraction(1, 10**6)
    return predicted.strip() == expected.strip()


# --------------------------------------------------------------------------------------------------
# Repetition / logic collapse
# --------------------------------------------------------------------------------------------------


def repetition_rate(token_ids: list[int], n: int = 4) -> float:
    """Share of repeated n-grams, ``1 - distinct / total``: 0 for varied text, near 1 for a loop.

    Quantised reasoning models fail by looping; this measures it independently of any tokenizer.
    Fewer than ``n`` tokens have no n-grams: 0.0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = len(token_ids) - n + 1
    if total <= 0:
        return 0.0
    ids = list(token_ids)
    distinct = len({tuple(ids[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


def _periodic_tail_length(ids: list[int], p: int) -> int:
    """How many final tokens are periodic with period ``p`` (ids[i] == ids[i + p] back from the end)."""
    i = len(ids) - p - 1
    while i >= 0 and ids[i] == ids[i + p]:
        i -= 1
    return len(ids) - (i + 1)


def longest_repeated_suffix_period(token_ids: list[int], min_repeats: int = 3) -> int | None:
    """Smallest period ``p <= len / min_repeats`` such that the last ``p`` tokens occur ``min_repeats``
    times back to back at the end of the output, else None.

    A loop that starts late in a long output barely moves the global repetition rate, but it shows as a
    repeating tail.
    """
    ids = list(token_ids)
    for p in range(1, len(ids) // min_repeats + 1):
        if _periodic_tail_length(ids, p) >= min_repeats * p:
            return p
    return None


def looks_collapsed(
    token_ids: list[int], finished: bool, n: int = 4, threshold: float = 0.5, min_tokens: int = 32
) -> bool:
    """Whether an output is a reasoning "logic collapse" (a loop), as opposed to merely long.

    Two signals, both only for outputs of at least ``min_tokens`` tokens (short outputs are never
    flagged: too few tokens to tell a loop from a list):

    * the whole output is repetitive: ``repetition_rate(token_ids, n) >= threshold`` (a model that
      degenerated so far is flagged even if it eventually emitted EOS);
    * the output did not finish (``finished`` is False: it hit the token budget) and its tail is a loop:
      some period repeats at least 3 times back to back and the periodic tail spans ``>= min_tokens``
      tokens. A finished output's tail is not a running loop, so this signal needs ``not finished``.

    An unfinished output that is not repetitive is not a collapse; the harness reports it as unfinished.
    """
    ids = list(token_ids)
    if len(ids) < min_tokens:
        return False
    if repetition_rate(ids, n) >= threshold:
        return True
    if finished:
        return False
    for p in range(1, len(ids) // 3 + 1):
        if _periodic_tail_length(ids, p) >= max(3 * p, min_tokens):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# Accuracy statistics
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021: ``1 - C(n-c, k) / C(n, k)`` for ``c`` correct of ``n`` samples.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms the huge binomials.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


_Z95 = 1.959963984540054  # standard normal 97.5% quantile


def accuracy_summary(correct: list[bool]) -> dict:
    """Accuracy with a 95% Wilson score interval, which stays inside [0, 1] and is sane for small n or
    accuracies near 0/1 (where the normal approximation is not): the comparisons between quantised
    models are made on a few hundred items, so the uncertainty must be reported."""
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy of zero items is undefined")
    c = sum(1 for x in correct if x)
    p = c / n
    z2 = _Z95 * _Z95
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return {"accuracy": p, "n": n, "correct": c, "ci95": [max(0.0, center - half), min(1.0, center + half)]}


# --------------------------------------------------------------------------------------------------
# Distribution distance from top-k logprobs
# --------------------------------------------------------------------------------------------------

_SUM_TOLERANCE = 1e-4  # top-k probabilities may exceed 1 by rounding only
_TAIL_FLOOR = 1e-12  # a softmax never gives an unlisted token exactly 0; also keeps the KL finite
_PROB_FLOOR = 1e-30  # a listed token with logprob -inf


def _topk_probs(logprobs: dict[int, float], side: str) -> tuple[dict[int, float], float]:
    if not logprobs:
        raise ValueError(f"{side}: no top-k logprobs for this position")
    probs = {}
    for tok, lp in logprobs.items():
        lp = float(lp)
        if math.isnan(lp):
            raise ValueError(f"{side}: logprob of token {tok} is NaN")
        probs[tok] = math.exp(min(lp, 1.0))  # the cap only avoids overflow: > 1 fails the sum check
    total = math.fsum(probs.values())
    if total > 1.0 + _SUM_TOLERANCE:
        raise ValueError(f"{side}: top-k probabilities sum to {total:.6f} > 1")
    return probs, max(0.0, 1.0 - total)


def _complete(probs: dict[int, float], rest: float, union: list[int]) -> list[float]:
    """One side's probabilities over the union of both top-k sets plus a final "rest" bucket.

    A token this side did not list gets ``min(smallest listed prob, rest / (m + 1))`` for m missing
    tokens: never more than the top-k ranking allows, and the tail mass is shared so that the rest
    bucket (tokens neither side listed) keeps at least as much as any one missing token.
    """
    rest = max(rest, _TAIL_FLOOR)
    missing = sum(1 for t in union if t not in probs)
    each = min(min(probs.values()), rest / (missing + 1)) if missing else 0.0
    each = max(each, _TAIL_FLOOR / (missing + 1))
    out = [probs[t] if t in probs else each for t in union]
    out.append(rest - missing * each if missing else rest)
    total = math.fsum(out)
    return [max(x, _PROB_FLOOR) / total for x in out]


def kl_from_topk(base_logprobs: dict[int, float], other_logprobs: dict[int, float]) -> float:
    """Estimate ``KL(P_base || P_other)`` at one position from the top-k logprobs each engine returned.

    vLLM returns only the top-k tokens per position and the two engines' top-k sets may differ. Both
    sides are completed to distributions over the same buckets: every token of the union of the two
    top-k sets, plus one "rest" bucket for all other tokens holding each side's remaining mass.
    A token missing from one side's top-k gets that side's tail estimate
    ``min(smallest listed prob, remaining mass / (missing + 1))``: the largest value the data allow
    (an unlisted token cannot outrank a listed one, nor exceed the mass that is left), so truncation
    does not invent divergence — a conservative (low-side) estimate. Lumping the unlisted tail into one
    bucket can only lower the KL (data processing inequality), which is also conservative.

    The result is >= 0 (both completed distributions sum to 1), exactly 0 for identical inputs, and the
    exact KL when the top-k sets cover the whole support (no missing tokens, no remaining mass).
    Probabilities summing above ``1 + 1e-4`` are not logprobs of one distribution: ValueError.
    """
    p_probs, p_rest = _topk_probs(base_logprobs, "base")
    q_probs, q_rest = _topk_probs(other_logprobs, "other")
    union = list(dict.fromkeys([*p_probs, *q_probs]))
    p = _complete(p_probs, p_rest, union)
    q = _complete(q_probs, q_rest, union)
    kl = math.fsum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi != qi)
    return max(0.0, kl)


def mean_kl(base_positions: list[dict[int, float]], other_positions: list[dict[int, float]]) -> float:
    """Mean per-position ``kl_from_topk`` over a sequence scored by both engines (same positions)."""
    if len(base_positions) != len(other_positions):
        raise ValueError(
            f"position counts differ: base has {len(base_positions)}, other has {len(other_positions)}"
        )
    if not base_positions:
        raise ValueError("no positions to compare")
    return math.fsum(kl_from_topk(b, o) for b, o in zip(base_positions, other_positions)) / len(
        base_positions
    )


# --------------------------------------------------------------------------------------------------
# Perplexity, retention, HellaSwag
# --------------------------------------------------------------------------------------------------


def perplexity(token_logprobs: list[float]) -> float:
    """``exp(-mean logprob)``: the effective number of equally likely choices per token."""
    if len(token_logprobs) == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    values = [float(x) for x in token_logprobs]
    bad = [x for x in values if not math.isfinite(x)]
    if bad:
        raise ValueError(f"non-finite token logprob(s): {bad[:3]}")
    return math.exp(-math.fsum(values) / len(values))


def retention(quantized: float, baseline: float) -> float | None:
    """Share of the baseline's score a quantised model keeps (``quantized / baseline``); None when the
    baseline scored 0, where no ratio is meaningful."""
    if baseline == 0:
        return None
    return quantized / baseline


def hellaswag_choice(
    ending_logprobs: list[list[float]], normalize: str = "tokens", ending_texts: list[str] | None = None
) -> int:
    """Index of the most likely ending; ties go to the lowest index.

    Longer endings have lower summed log-likelihood, so scores are length-normalised: ``"tokens"``
    (default) divides by the number of tokens, ``"chars"`` by the ending's character count (lm-eval-harness
    ``acc_norm``; needs ``ending_texts``), ``"none"`` uses the raw sum (``acc``).
    """
    if not ending_logprobs:
        raise ValueError("no endings to choose from")
    if normalize not in ("tokens", "chars", "none"):
        raise ValueError(f"normalize must be 'tokens', 'chars' or 'none', got {normalize!r}")
    if normalize == "chars":
        if ending_texts is None or len(ending_texts) != len(ending_logprobs):
            raise ValueError("normalize='chars' needs ending_texts, one per ending")
    best, best_score = -1, -math.inf
    for i, lps in enumerate(ending_logprobs):
        if len(lps) == 0:
            raise ValueError(f"ending {i} has no tokens")
        if any(math.isnan(x) for x in lps):
            raise ValueError(f"ending {i} has a NaN logprob")
        total = math.fsum(lps)
        if normalize == "tokens":
            score = total / len(lps)
        elif normalize == "chars":
            if not ending_texts[i]:
                raise ValueError(f"ending {i} has an empty text")
            score = total / len(ending_texts[i])
        else:
            score = total
        if best < 0 or score > best_score:
            best, best_score = i, score
    return best
