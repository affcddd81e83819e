"""Reward functions used by the manager tests (imported by name inside reward worker processes)."""

import os
import time

from megarl.rewards import register_reward


def misbehaving_reward(data_source, solution_str, ground_truth, extra_info=None):
    """Exact match, except the special responses that sleep, raise, exit or return junk."""
    if solution_str == "sleep":
        time.sleep(60)
    if solution_str == "raise":
        raise RuntimeError("reward bug")
    if solution_str == "exit":
        os._exit(3)
    if solution_str == "nan":
        return float("nan")
    if solution_str == "no score key":
        return {"acc": 1.0}
    return 1.0 if solution_str == ground_truth else 0.0


def response_char_counts(data_sources, solution_strs, ground_truths, extra_infos, scale=1.0):
    """A batch reward: scale * len(response)."""
    return [scale * len(s) for s in solution_strs]


@register_reward("test_fixture_length")
def length_reward(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(extra_info["response_length"]), "pid_is_worker": float(os.getpid() != int(ground_truth))}


def keyword_order_reward(solution_str, ground_truth, data_source=None, extra_info=None, bonus=0.0):
    """verl calls custom rewards by keyword, so a different parameter order must work."""
    return (1.0 if solution_str == ground_truth else 0.0) + bonus
