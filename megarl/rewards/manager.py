"""RewardManager: the one entry point the trainer calls to score a batch of responses.

    manager = RewardManager(RewardConfig(...))        # resolves every term, starts the worker pool
    out = manager.score([RewardRequest(...), ...])     # → RewardOutput(scores, metrics, details)
    manager.close()

Every call of a reward function gets verl's keyword arguments ``data_source, solution_str,
ground_truth, extra_info`` (plus the term's kwargs); ``extra_info`` is a copy of the sample's extra_info with two keys added:
``response_length`` (response tokens) and, when the request carries a conversation, ``messages``
(the multi-turn trajectory, response included). A call that raises, times out, or returns a
non-finite score gives that term ``fallback_score`` and is counted in ``reward/errors`` or
``reward/timeouts``; the rest of the batch is scored normally.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from megarl.rewards.config import RewardConfig, RewardTermConfig
from megarl.rewards.pool import CallOutcome, RewardCall, RewardRef, RewardWorkerPool, describe_exception
from megarl.rewards.registry import RewardEntry, is_custom_spec, resolve_reward
from megarl.utils.user_code import absolute_spec

logger = logging.getLogger(__name__)

_MAX_LOGGED_FAILURES = 5


@dataclass
class RewardRequest:
    """One response to score. response_length is in tokens (for length-shaped rewards)."""

    data_source: str
    response: str
    ground_truth: Any
    extra_info: dict | None = None
    response_length: int = 0
    messages: list[dict] | None = None


@dataclass
class RewardOutput:
    """scores[i]: the weighted reward of request i. metrics: batch aggregates (``reward/score/mean``,
    ``reward/<term>/mean``, ``reward/<extra key>/mean``, ``reward/errors``, ``reward/timeouts``).
    details[i]: request i's term scores and extra keys (failed terms hold the fallback score)."""

    scores: list[float]
    metrics: dict[str, float]
    details: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Term:
    config: RewardTermConfig
    entry: RewardEntry
    ref: RewardRef


def normalize_result(value: Any) -> tuple[float, dict[str, float]]:
    """A reward's return value → (score, numeric extras). Raises ValueError if it is unusable."""
    extras: dict[str, float] = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"a reward returned a dict without a 'score' key: keys {sorted(value)}")
        score = value["score"]
        # Numeric extras become metrics; others (e.g. the extracted answer string) are not aggregatable.
        extras = {key: float(extra) for key, extra in value.items()
                  if key != "score" and isinstance(extra, numbers.Real)}
    else:
        score = value
    try:
        score = float(score)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a reward returned {type(value).__name__} {value!r}, expected a float or a dict "
                         "with 'score'") from exc
    if not math.isfinite(score):
        raise ValueError(f"a reward returned a non-finite score {score}")
    return score, extras


class RewardManager:
    def __init__(self, config: RewardConfig | None = None):
        self.config = config or RewardConfig()
        self.config.validate()
        self._terms = [self._resolve_term(term) for term in self.config.terms]
        self._multi_term = len(self._terms) > 1
        needs_pool = any(not term.entry.in_process for term in self._terms)
        for term in self._terms:
            if needs_pool and self.config.num_workers > 0 and term.ref.module == "__main__":
                raise ValueError(f"reward {term.config.name!r} is registered in the __main__ script, which reward "
                                 "worker processes cannot import: move it to a module, or name it as "
                                 "path/to/file.py:function")
        self._pool = (RewardWorkerPool(self.config.num_workers, self.config.timeout_s, self.config.start_method)
                      if needs_pool and self.config.num_workers > 0 else None)
        self.total_errors = 0
        self.total_timeouts = 0
        self._logged_failures = 0

    @staticmethod
    def _resolve_term(term: RewardTermConfig) -> _Term:
        # workers may run in another directory: a file path is made absolute
        spec = absolute_spec(term.name) if is_custom_spec(term.name) else term.name
        entry = resolve_reward(spec, batched=term.batched)
        _check_signature(term, entry)
        module = None if is_custom_spec(spec) else entry.fn.__module__
        return _Term(config=term, entry=entry, ref=RewardRef(spec=spec, module=module))

    def check_data_sources(self, data_sources) -> None:
        """Fail now, not in every reward call, if a "default" term has no reward for a dataset's data_source.

        Call it once at start-up with the training (and validation) datasets' data_source values.
        """
        from megarl.rewards.default import reward_name_for

        if any(term.config.name == "default" for term in self._terms):
            for data_source in sorted(set(data_sources)):
                reward_name_for(data_source)

    # ------------------------------------------------------------------ scoring

    def score(self, requests: Sequence[RewardRequest]) -> RewardOutput:
        """Score a batch; never raises because of a reward function."""
        extra_infos = [_call_extra_info(r) for r in requests]
        outcomes_per_term = self._run_terms(requests, extra_infos)

        scores = [0.0] * len(requests)
        details: list[dict[str, float]] = [{} for _ in requests]
        term_scores: dict[str, list[float]] = {}
        extra_values: dict[str, list[float]] = {}
        errors = timeouts = 0
        for term, outcomes in zip(self._terms, outcomes_per_term):
            label = term.config.metric_label()
            term_scores[label] = []
            for i, outcome in enumerate(outcomes):
                value, extras, failure = self._interpret(outcome, term, requests[i])
                if failure == "timeout":
                    timeouts += 1
                elif failure == "error":
                    errors += 1
                scores[i] += term.config.weight * value
                term_scores[label].append(value)
                details[i][label] = value
                for key, extra in extras.items():
                    name = f"{label}/{key}" if self._multi_term else key
                    extra_values.setdefault(name, []).append(extra)
                    details[i][name] = extra
        self.total_errors += errors
        self.total_timeouts += timeouts

        metrics = _summary("reward/score", scores)
        if self._multi_term:
            for label, values in term_scores.items():
                metrics[f"reward/{label}/mean"] = _mean(values)
        for name, values in extra_values.items():
            metrics[f"reward/{name}/mean"] = _mean(values)
        metrics["reward/errors"] = float(errors)
        metrics["reward/timeouts"] = float(timeouts)
        return RewardOutput(scores=scores, metrics=metrics, details=details)

    def score_batch(self, data_sources, responses, ground_truths, extra_infos, response_lengths,
                    messages=None) -> RewardOutput:
        """Column form of score(): parallel lists, one entry per response."""
        n = len(responses)
        columns = {"data_sources": data_sources, "ground_truths": ground_truths, "extra_infos": extra_infos,
                   "response_lengths": response_lengths}
        if messages is not None:
            columns["messages"] = messages
        for name, column in columns.items():
            if len(column) != n:
                raise ValueError(f"score_batch: {name} has {len(column)} entries, responses has {n}")
        return self.score([
            RewardRequest(data_sources[i], responses[i], ground_truths[i], extra_infos[i], int(response_lengths[i]),
                          messages[i] if messages is not None else None)
            for i in range(n)
        ])

    def _run_terms(self, requests, extra_infos) -> list[list[CallOutcome]]:
        """Outcomes [term][sample]. Pool calls of all terms are submitted together."""
        n = len(requests)
        calls: list[RewardCall] = []
        spans: list[tuple[int, int] | None] = []  # per term: slice of `calls`, or None if run inline
        for term in self._terms:
            if term.entry.in_process or self._pool is None:
                spans.append(None)
                continue
            start = len(calls)
            calls.extend(_calls_for(term, requests, extra_infos))
            spans.append((start, len(calls)))
        pooled = self._pool.run(calls) if calls else []

        results: list[list[CallOutcome]] = []
        for term, span in zip(self._terms, spans):
            if span is None:
                term_outcomes = [_call_inline(term, call) for call in _calls_for(term, requests, extra_infos)]
            else:
                term_outcomes = pooled[span[0]:span[1]]
            if term.entry.batched:
                term_outcomes = _unbatch(term_outcomes[0], n) if n else []
            results.append(term_outcomes)
        return results

    def _interpret(self, outcome: CallOutcome, term: _Term, request: RewardRequest):
        """→ (score, extras, failure kind or None); failures give the fallback score."""
        if outcome.status == "ok":
            try:
                score, extras = normalize_result(outcome.value)
                return score, extras, None
            except ValueError as exc:
                outcome = CallOutcome("error", error=str(exc))
        self._log_failure(term, request, outcome)
        return self.config.fallback_score, {}, outcome.status

    def _log_failure(self, term: _Term, request: RewardRequest, outcome: CallOutcome) -> None:
        if self._logged_failures >= _MAX_LOGGED_FAILURES:
            return
        self._logged_failures += 1
        logger.warning("reward %r %s on data_source %r (fallback %s): %s", term.config.name, outcome.status,
                       request.data_source, self.config.fallback_score, outcome.error)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _call_extra_info(request: RewardRequest) -> dict:
    info = dict(request.extra_info or {})
    info["response_length"] = int(request.response_length)
    if request.messages is not None:
        info["messages"] = request.messages
    return info


def _calls_for(term: _Term, requests, extra_infos) -> list[RewardCall]:
    kwargs = term.config.kwargs
    timeout = term.config.timeout_s
    if term.entry.batched:
        batch = dict(data_sources=[r.data_source for r in requests], solution_strs=[r.response for r in requests],
                     ground_truths=[r.ground_truth for r in requests], extra_infos=list(extra_infos))
        return [RewardCall(term.ref, (), {**batch, **kwargs}, timeout)] if requests else []
    # By keyword, as verl calls custom reward functions: their parameter order is free.
    return [RewardCall(term.ref, (), dict(data_source=r.data_source, solution_str=r.response,
                                          ground_truth=r.ground_truth, extra_info=info, **kwargs), timeout)
            for r, info in zip(requests, extra_infos)]


def _call_inline(term: _Term, call: RewardCall) -> CallOutcome:
    try:
        return CallOutcome("ok", term.entry.fn(*call.args, **call.kwargs))
    except Exception as exc:  # noqa: BLE001 - a reward never stops training
        return CallOutcome("error", error=describe_exception(exc))


def _unbatch(outcome: CallOutcome, n: int) -> list[CallOutcome]:
    """One batch call's outcome → n per-sample outcomes (a failed or mis-sized batch fails every sample)."""
    if outcome.status != "ok":
        return [outcome] * n
    values = outcome.value
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        return [CallOutcome("error", error=f"batch reward returned {got} results for {n} samples")] * n
    return [CallOutcome("ok", value) for value in values]


def _check_signature(term: RewardTermConfig, entry: RewardEntry) -> None:
    """Bind the call's arguments now, so a wrong kwarg fails at start-up instead of in every call."""
    try:
        signature = inspect.signature(entry.fn)
    except (TypeError, ValueError):
        return  # builtins / C functions: nothing to check
    try:
        if entry.batched:
            signature.bind(data_sources=[], solution_strs=[], ground_truths=[], extra_infos=[], **term.kwargs)
        else:
            signature.bind(data_source="", solution_str="", ground_truth="", extra_info={}, **term.kwargs)
    except TypeError as exc:
        kind = "data_sources, solution_strs, ground_truths, extra_infos" if entry.batched else \
            "data_source, solution_str, ground_truth, extra_info"
        raise ValueError(f"reward term {term.name!r} cannot be called as fn({kind}, **{term.kwargs}): {exc}") from exc


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _summary(prefix: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {f"{prefix}/mean": 0.0}
    mean = _mean(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {f"{prefix}/mean": mean, f"{prefix}/std": std, f"{prefix}/max": max(values), f"{prefix}/min": min(values)}
