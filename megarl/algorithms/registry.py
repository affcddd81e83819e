"""A named registry of functions: a decorator to add one, a lookup whose error lists what exists.

    POLICY_LOSSES = Registry("policy loss")

    @POLICY_LOSSES.register("ppo", aliases=("vanilla",))
    def ppo(...): ...

    POLICY_LOSSES.get("ppoo")  # KeyError: unknown policy loss 'ppoo'; registered: gspo, ppo, vanilla
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. A KeyError for lookups, a ValueError for config validation."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
        """Decorator: register fn under `name` (and `aliases`). Registering a taken name is an error."""

        def decorator(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._entries and self._entries[key] is not fn:
                    raise ValueError(f"{self.kind} {key!r} is already registered as {self._entries[key]!r}")
                self._entries[key] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}"
            ) from None

    def check(self, name: str) -> None:
        """Raise the same error as get() if `name` is not registered (for validating options early)."""
        self.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
