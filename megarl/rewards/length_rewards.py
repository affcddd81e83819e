"""Length- and repetition-shaped rewards.

Token lengths come from ``extra_info["response_length"]`` (number of response tokens), which the
RewardManager fills in for every call.
"""

from __future__ import annotations

import math

from megarl.rewards.registry import get_reward, register_reward


def _response_length(extra_info) -> int:
    if not extra_info or extra_info.get("response_length") is None:
        raise ValueError("length-based rewards need extra_info['response_length'] (response tokens); "
                         "the RewardManager sets it from RewardRequest.response_length")
    return int(extra_info["response_length"])


def overlong_penalty(response_length: int, max_response_length: int, overlong_buffer_len: int,
                     penalty_factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (≤ 0).

    Lengths up to ``max_response_length - overlong_buffer_len`` are free; inside the buffer the penalty
    grows linearly from 0 to ``-penalty_factor`` at ``max_response_length``:
    ``min(0, -(length - (max - buffer)) / buffer * penalty_factor)``. E.g. max 100, buffer 20: length
    80 → 0.0, 90 → -0.5, 100 → -1.0.
    """
    if overlong_buffer_len <= 0 or overlong_buffer_len > max_response_length:
        raise ValueError(f"overlong_buffer_len must be in (0, max_response_length={max_response_length}], "
                         f"got {overlong_buffer_len}")
    exceed = response_length - (max_response_length - overlong_buffer_len)
    return min(0.0, -exceed / overlong_buffer_len * penalty_factor)


@register_reward("overlong")
def overlong(data_source, solution_str, ground_truth, extra_info=None, *, max_response_length,
             overlong_buffer_len, penalty_factor=1.0):
    """Soft overlong penalty (DAPO overlong buffer) from extra_info['response_length']; add it to a
    correctness reward as a weighted term."""
    return overlong_penalty(_response_length(extra_info), max_response_length, overlong_buffer_len, penalty_factor)


def cosine_scaled(is_correct: bool, response_length: int, max_length: int, min_value_wrong=-1.0,
                  max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0) -> float:
    """Cosine length scaling of correctness (Yeo et al. 2025, "Demystifying Long CoT").

    progress = min(length / max_length, 1); correct answers go from max_value_correct (length 0) down
    to min_value_correct (length ≥ max_length): shorter is better. Wrong answers go from
    min_value_wrong (length 0) up to max_value_wrong: a long attempt is penalised less than a short
    wrong guess. value = lo + (hi - lo) * (1 + cos(pi * progress)) / 2.
    """
    progress = min(response_length / max_length, 1.0)
    if is_correct:
        lo, hi = min_value_correct, max_value_correct
    else:
        lo, hi = max_value_wrong, min_value_wrong
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))


@register_reward("cosine")
def cosine(data_source, solution_str, ground_truth, extra_info=None, *, max_length, correctness="math",
           min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0):
    """Correctness (a registered reward named by ``correctness``, correct if its score ≥ 0.5) scaled by
    response length; see cosine_scaled. Returns {"score", "acc"}."""
    base = get_reward(correctness).fn(data_source, solution_str, ground_truth, extra_info)
    base_score = base["score"] if isinstance(base, dict) else base
    correct = float(base_score) >= 0.5
    value = cosine_scaled(correct, _response_length(extra_info), max_length, min_value_wrong, max_value_wrong,
                          min_value_correct, max_value_correct)
    return {"score": value, "acc": float(correct)}


def ngram_repetition_fraction(text: str, ngram_size: int) -> float:
    """1 - unique/total over the whitespace-word n-grams of the lower-cased text (0.0 if shorter than
    one n-gram). "a b a b a b", n=2: 5 n-grams, 2 unique → 0.6."""
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams)


@register_reward("repetition")
def repetition_penalty(data_source, solution_str, ground_truth=None, extra_info=None, ngram_size=3,
                       max_penalty=-1.0):
    """N-gram repetition penalty: ``max_penalty * ngram_repetition_fraction`` (≤ 0 for max_penalty ≤ 0)."""
    if max_penalty > 0:
        raise ValueError(f"repetition max_penalty must be ≤ 0, got {max_penalty}")
    return max_penalty * ngram_repetition_fraction(solution_str, ngram_size)
