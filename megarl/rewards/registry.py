"""The reward registry, and loading of users' own reward functions.

Every reward is a function with verl's signature

    compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict

returning a float, or a dict whose "score" entry is the reward and whose other numeric entries are
logged as metrics. Batch rewards (``batched=True``) take lists instead, with the keyword names verl's
batch reward manager uses:

    compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs) -> list[float | dict]

A reward is named in configs either by its registered name ("math", "gsm8k", ...) or by
``path/to/file.py:function`` or ``package.module:function`` (users' verl reward files work unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megarl.utils.registry import Registry
from megarl.utils.user_code import UserCodeError, is_user_code_spec, load_user_object


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward function and how the manager must call it."""

    name: str
    fn: Callable
    batched: bool = False
    # In-process rewards hold state that must not be copied into worker processes (a reward model);
    # they run in the trainer's process, with exceptions caught but no timeout.
    in_process: bool = False


# The built-in rewards register when megarl.rewards.builtin is imported, at the first lookup.
REWARDS: Registry[RewardEntry] = Registry(
    "reward", builtins="megarl.rewards.builtin", origin=lambda entry: entry.fn,
    hint="(or give a custom one as path/to/file.py:function or package.module:function)")


def register_reward(name: str, *, batched: bool = False, in_process: bool = False):
    """Decorator: ``@register_reward("my_reward")`` makes a compute_score function usable by name."""

    def decorator(fn: Callable) -> Callable:
        REWARDS.add(name, RewardEntry(name=name, fn=fn, batched=batched, in_process=in_process))
        return fn

    return decorator


def registered_rewards() -> list[str]:
    return REWARDS.names()


def get_reward(name: str) -> RewardEntry:
    """The registered reward ``name``; unknown names raise UnknownNameError (a KeyError) listing them."""
    return REWARDS.get(name)


is_custom_spec = is_user_code_spec


def resolve_reward(spec: str, *, batched: bool = False) -> RewardEntry:
    """A registered name, ``file.py:function`` or ``module:function`` → RewardEntry.

    Custom functions default to per-sample calls; pass ``batched=True`` for a batch function.
    Errors name what was missing (file, module or function) so a typo fails at start-up.
    """
    if not is_custom_spec(spec):
        return get_reward(spec)
    return RewardEntry(name=spec, fn=load_function(spec), batched=batched)


def load_function(spec: str) -> Callable:
    """Load ``path/to/file.py:function`` or ``package.module:function``."""
    fn = load_user_object(spec, what="custom reward")
    if not callable(fn):
        raise UserCodeError(f"custom reward {spec!r} is a {type(fn).__name__}, not a function")
    return fn
