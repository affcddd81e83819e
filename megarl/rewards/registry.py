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

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward function and how the manager must call it."""

    name: str
    fn: Callable
    batched: bool = False
    # In-process rewards hold state that must not be copied into worker processes (a reward model);
    # they run in the trainer's process, with exceptions caught but no timeout.
    in_process: bool = False


_REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, *, batched: bool = False, in_process: bool = False):
    """Decorator: ``@register_reward("my_reward")`` makes a compute_score function usable by name."""

    def decorator(fn: Callable) -> Callable:
        existing = _REWARDS.get(name)
        if existing is not None and existing.fn is not fn and _qualname(existing.fn) != _qualname(fn):
            raise ValueError(f"reward {name!r} is already registered by {_qualname(existing.fn)}")
        _REWARDS[name] = RewardEntry(name=name, fn=fn, batched=batched, in_process=in_process)
        return fn

    return decorator


def registered_rewards() -> list[str]:
    _ensure_builtins()
    return sorted(_REWARDS)


def get_reward(name: str) -> RewardEntry:
    """The registered reward ``name``; unknown names raise KeyError listing what is registered."""
    _ensure_builtins()
    if name not in _REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(_REWARDS))} "
                       "(or give a custom one as path/to/file.py:function or package.module:function)")
    return _REWARDS[name]


def is_custom_spec(spec: str) -> bool:
    return ":" in spec


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
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise ValueError(f"custom reward {spec!r} must look like path/to/file.py:function or module:function")
    if target.endswith(".py") or os.sep in target:
        module = _load_file_module(target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"custom reward {spec!r}: cannot import module {target!r}: {exc}") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"custom reward {spec!r}: {target!r} has no function {fn_name!r}")
    return fn


def _load_file_module(path: str):
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"custom reward file {path!r} does not exist")
    # One module name per file path (stable across processes, unlike hash()), loaded once per process.
    module_name = "megarl_custom_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
    return module


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _ensure_builtins() -> None:
    # Importing the built-in reward modules registers them; done lazily so the registry module
    # itself stays import-light (workers import it first).
    import megarl.rewards.builtin  # noqa: F401
