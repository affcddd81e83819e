"""The registry class lives in `megarl.utils.registry` (one class behind every registry); this name
stays importable for algorithm modules written against it."""

from megarl.utils.registry import Registry, UnknownNameError

__all__ = ["Registry", "UnknownNameError"]
