"""Typed options of the reward stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megarl.config.schema import RewardConfig as _RewardSection

_SECTION = _RewardSection()  # the defaults of the fields that come from the run config live there


@dataclass
class RewardTermConfig:
    """One reward term. The final reward is ``sum(weight * term_score)`` over the terms.

    name: a registered reward ("default", "math", "gsm8k", "format", "react_format", "cosine",
      "repetition", "overlong", "synthetic_arith", "reward_model", or your own @register_reward name),
      or a custom function as ``path/to/file.py:function`` / ``package.module:function``.
    kwargs: extra keyword arguments for the function (verl's ``reward_kwargs``).
    batched: a custom function takes lists (``data_sources, solution_strs, ground_truths,
      extra_infos``) and returns a list; registered rewards declare this themselves.
    label: the metric name of this term (default: the registered name, or the custom function's name).
    timeout_s: this term's per-call timeout (a batch reward is one call for the whole batch);
      None uses RewardConfig.timeout_s.
    """

    name: str = "default"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    batched: bool = False
    label: str | None = None
    timeout_s: float | None = None

    def metric_label(self) -> str:
        if self.label:
            return self.label
        return self.name.rpartition(":")[2] if ":" in self.name else self.name


@dataclass
class RewardConfig:
    """How responses are scored.

    num_workers: reward worker processes; 0 runs rewards inline in the trainer (no timeout: debugging only).
    timeout_s: per call (one sample, or one batch for batch rewards) before the worker is killed.
    fallback_score: the score a term gets when its call raises, times out, or returns a non-finite value.
    start_method: multiprocessing start method of the workers ("forkserver" is safe next to threads).
    """

    terms: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    num_workers: int = _SECTION.num_workers
    timeout_s: float = _SECTION.timeout_s
    fallback_score: float = _SECTION.fallback
    start_method: str = "forkserver"

    @classmethod
    def from_config(cls, reward, max_response_length: int) -> "RewardConfig":
        """From megarl.config's RewardConfig section: its named terms with their weights (or the one
        custom function), plus DAPO's overlong term when reward.overlong_buffer is on
        (`max_response_length` = rollout.max_new_tokens)."""
        if reward.custom_function:
            terms = [RewardTermConfig(name=reward.custom_function)]
        else:
            terms = [RewardTermConfig(name=name, weight=weight) for name, weight in reward.terms()]
        ob = reward.overlong_buffer
        if ob.enable:
            terms.append(RewardTermConfig(name="overlong", kwargs={
                "max_response_length": max_response_length, "overlong_buffer_len": ob.len,
                "penalty_factor": ob.penalty_factor}))
        return cls(terms=terms, num_workers=reward.num_workers, timeout_s=reward.timeout_s,
                   fallback_score=reward.fallback)

    def validate(self) -> None:
        if not self.terms:
            raise ValueError("reward.terms is empty: give at least one reward term (e.g. name: default)")
        if self.num_workers < 0:
            raise ValueError(f"reward.num_workers must be ≥ 0 (0 = inline), got {self.num_workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if not math.isfinite(self.fallback_score):
            raise ValueError(f"reward.fallback_score must be finite, got {self.fallback_score}")
        if self.start_method not in ("forkserver", "spawn", "fork"):
            raise ValueError(f"reward.start_method must be forkserver, spawn or fork, got {self.start_method!r}")
        labels = [term.metric_label() for term in self.terms]
        for term in self.terms:
            if not math.isfinite(term.weight):
                raise ValueError(f"reward term {term.name!r}: weight must be finite, got {term.weight}")
            if term.timeout_s is not None and not term.timeout_s > 0:
                raise ValueError(f"reward term {term.name!r}: timeout_s must be > 0, got {term.timeout_s}")
            if not isinstance(term.kwargs, dict):
                raise ValueError(f"reward term {term.name!r}: kwargs must be a mapping, got {type(term.kwargs).__name__}")
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"reward terms share the metric label(s) {duplicates}; set `label` to tell them apart")
