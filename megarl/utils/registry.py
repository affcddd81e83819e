"""The one registry class behind every extension point users register into (advantage estimators,
policy losses, KL estimators, loss aggregations, DPO losses, rewards, multi-turn schedulers, weight
transports): a decorator to add an entry, a lookup whose error lists what exists.

    POLICY_LOSSES = Registry("policy loss")

    @POLICY_LOSSES.register("ppo", aliases=("vanilla",))
    def ppo(...): ...

    POLICY_LOSSES.get("ppoo")  # UnknownNameError: unknown policy loss 'ppoo'; registered: gspo, ppo, vanilla
    "ppo" in POLICY_LOSSES, POLICY_LOSSES.names()

A name taken by another object is an error. Registering the same object again (or one with the same
module and qualified name: a module imported a second time, e.g. in a reward worker process) is
allowed and keeps the newest. `builtins` names a module imported at the first lookup, whose import
registers the built-in entries (so the module holding the registry stays import-light).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. A KeyError for lookups, a ValueError for config validation."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, *, hint: str = "", builtins: str | None = None,
                 origin: Callable[[Any], Any] = lambda entry: entry):
        """`kind` names the entries in errors ("policy loss"); `hint` is appended to the unknown-name
        error (e.g. how to give user code instead); `origin(entry)` is the function or class an
        entry stands for, compared when a name is registered twice."""
        self.kind = kind
        self.hint = hint
        self._builtins = builtins
        self._origin = origin
        self._entries: dict[str, T] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (and `aliases`); returns it unchanged."""

        def decorator(entry: T) -> T:
            self.add(name, entry, aliases=aliases)
            return entry

        return decorator

    def add(self, name: str, entry: T, *, aliases: tuple[str, ...] = ()) -> T:
        for key in (name, *aliases):
            existing = self._entries.get(key)
            if existing is not None and not _same_origin(self._origin(existing), self._origin(entry)):
                raise ValueError(f"{self.kind} {key!r} is already registered as {_describe(self._origin(existing))}")
        for key in (name, *aliases):
            self._entries[key] = entry
        return entry

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
                                   + (f" {self.hint}" if self.hint else "")) from None

    def check(self, name: str) -> None:
        """Raise the same error as get() if `name` is not registered (for validating options early)."""
        self.get(name)

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(sorted(self._entries))})"

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # first: its import registers into this registry
            try:
                importlib.import_module(module)
            except BaseException:
                self._builtins = module
                raise


def _same_origin(a, b) -> bool:
    return a is b or _describe(a) == _describe(b)


def _describe(obj) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(obj)
