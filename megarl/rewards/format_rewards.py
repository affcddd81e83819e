"""Format rewards: reasoning tags and the ReAct protocol. Both score 1.0 for a well-formed response, else 0.0."""

from __future__ import annotations

import re

from megarl.rewards.registry import register_reward

_THINK_ANSWER = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def has_think_answer_format(text: str) -> bool:
    """``<think>…</think><answer>…</answer>`` and nothing else (whitespace aside), each tag exactly
    once, and a non-empty answer."""
    match = _THINK_ANSWER.match(text)
    if match is None or any(text.count(tag) != 1 for tag in _TAGS):
        return False
    return bool(match.group(2).strip())


@register_reward("format")
def think_answer_format(data_source, solution_str, ground_truth=None, extra_info=None, think_in_prompt=False,
                        score=1.0):
    """``score`` if the response is ``<think>…</think><answer>…</answer>``, else 0.0.

    think_in_prompt: the chat template already opened ``<think>`` in the generation prompt (as
    DeepSeek-R1 style templates do), so the response starts inside the thinking block.
    """
    text = "<think>" + solution_str if think_in_prompt else solution_str
    return score if has_think_answer_format(text) else 0.0


_REACT_THOUGHT = re.compile(r"^\s*Thought:\s*\S", re.DOTALL)
_REACT_ACTION = re.compile(r"Action:\s*\S.*?Action Input:\s*\S", re.DOTALL)
_REACT_FINAL = re.compile(r"Final Answer:\s*\S", re.DOTALL)


def has_react_format(text: str) -> bool:
    """A ReAct step: starts with ``Thought:`` and then either ``Action: …`` followed by
    ``Action Input: …`` or ``Final Answer: …`` — exactly one of the two (a step that both acts and
    answers is ambiguous, as ReAct parsers such as LangChain's also reject)."""
    if _REACT_THOUGHT.match(text) is None:
        return False
    acts = _REACT_ACTION.search(text) is not None
    answers = _REACT_FINAL.search(text) is not None
    return acts != answers


@register_reward("react_format")
def react_format(data_source, solution_str, ground_truth=None, extra_info=None, score=1.0):
    """``score`` if the response is one well-formed ReAct step (see has_react_format), else 0.0."""
    return score if has_react_format(solution_str) else 0.0
