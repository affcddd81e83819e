"""Correctness rewards for math: \\boxed / final-answer equivalence (via math-verify) and GSM8K ``####``.

Equivalence is decided by the maintained ``math-verify`` library (LaTeX and plain expressions parsed
to sympy, then compared numerically and symbolically), not by hand-written LaTeX normalisation.
"""

from __future__ import annotations

import re
import threading

# Imported here, not in the call: loading sympy takes about a second, which belongs to worker start-up
# (excluded from the per-call timeout), not to the first reward call.
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from megarl.rewards.registry import register_reward

# verl's GSM8K scorer also looks only at the tail of long responses: the final answer is at the end,
# and regex scans of very long degenerate outputs would cost time for nothing.
GSM8K_TAIL_CHARS = 300

_GSM8K_STRICT = re.compile(r"#### \$?(\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"\-?[0-9][0-9\,]*(?:\.[0-9]+)?")


def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere the
    # reward pool's own per-call timeout protects us.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_equivalent(prediction_text: str, ground_truth: str) -> bool:
    """True if the answer in ``prediction_text`` equals ``ground_truth`` mathematically.

    The prediction's answer is its first \\boxed{...} if it has one, else the last plain expression
    (math-verify's extraction). The ground truth is a bare answer ("12", "\\frac{1}{2}") or may
    already contain \\boxed{}.
    """
    timeout = _math_verify_timeout()
    gold_text = ground_truth if "\\boxed" in ground_truth else "\\boxed{" + ground_truth + "}"
    gold = parse(gold_text, extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)
    if not gold:
        gold = parse(ground_truth, extraction_config=[ExprExtractionConfig()], parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the ground truth {ground_truth!r}")
    pred = parse(
        prediction_text,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


@register_reward("math")
def math_accuracy(data_source, solution_str, ground_truth, extra_info=None, correct_score=1.0, wrong_score=0.0):
    """1.0 if the response's final answer (\\boxed{} first) equals ground_truth, else 0.0.

    Examples: "... \\boxed{12}" vs "12" → 1.0; "\\boxed{\\frac{1}{2}}" vs "0.5" → 1.0; "\\boxed{13}" vs "12" → 0.0.
    """
    return correct_score if math_equivalent(solution_str, str(ground_truth)) else wrong_score


def extract_gsm8k_answer(solution_str: str, method: str = "strict") -> str | None:
    """The answer after the last ``#### `` (strict) or the last number in the text (flexible).

    Commas and dollar signs are removed ("#### 1,000" → "1000"). None if nothing is found.
    """
    tail = solution_str[-GSM8K_TAIL_CHARS:]
    if method == "strict":
        found = _GSM8K_STRICT.findall(tail)
    elif method == "flexible":
        found = _NUMBER.findall(tail)
    else:
        raise ValueError(f"gsm8k method must be 'strict' or 'flexible', got {method!r}")
    if not found:
        return None
    return found[-1].replace(",", "").replace("$", "").rstrip(".")


def _numbers_equal(a: str, b: str) -> bool:
    a, b = a.replace(",", "").strip(), b.replace(",", "").strip()
    try:
        return abs(float(a) - float(b)) < 1e-9 * max(1.0, abs(float(b)))
    except ValueError:
        return a == b


@register_reward("gsm8k")
def gsm8k_accuracy(
    data_source, solution_str, ground_truth, extra_info=None, method="strict", format_score=0.0, score=1.0
):
    """GSM8K: ``score`` if the ``#### <answer>`` equals ground_truth (numerically: "72.0" == "72"),
    ``format_score`` if an answer was found but is wrong, 0.0 if none was found (verl's convention).
    """
    answer = extract_gsm8k_answer(solution_str, method)
    if answer is None:
        return 0.0
    return score if _numbers_equal(answer, str(ground_truth)) else format_score


def last_boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced) or ``\\boxed x`` in text, else None.

    This only locates the answer string (for building ground truths); equivalence is math-verify's job.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    rest = text[start + len("\\boxed"):]
    if rest.startswith(" "):  # "\boxed 5": the answer runs to the next "$" or whitespace
        return rest.strip().split("$")[0].split()[0] if rest.strip() else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return rest[1:i]
    return None
