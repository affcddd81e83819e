"""Loading users' own code named in a config: `path/to/file.py:name` or `package.module:name`.

The one loader behind every `path.py:fn` extension point (custom rewards, multi-turn schedulers).
A file is imported once per process under a module name derived from its absolute path
(`megarl_user_<stem>_<sha1 of the path>`), the same in every process, so objects defined there
pickle by reference between the trainer and its workers, and a file that registers something
(`@register_reward`) registers it once, not once per loading site.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from typing import Any


class UserCodeError(ValueError):
    """A spec that does not name loadable user code (malformed, missing module or attribute)."""


class UserFileNotFoundError(UserCodeError, FileNotFoundError):
    """The file a spec names does not exist."""


def is_user_code_spec(spec: str) -> bool:
    """True for `file.py:name` / `module:name` (registered names never contain ':')."""
    return ":" in spec


def split_spec(spec: str) -> tuple[str, str]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserCodeError(f"{spec!r} must look like path/to/file.py:name or package.module:name")
    return target, attr


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or os.sep in target


def absolute_spec(spec: str) -> str:
    """The same spec with a file path made absolute (workers may run in another directory)."""
    target, attr = split_spec(spec)
    return f"{os.path.abspath(os.path.expanduser(target))}:{attr}" if is_file_target(target) else spec


def load_user_object(spec: str, *, what: str = "user code") -> Any:
    """The object `spec` names. `what` ("custom reward", "multi-turn scheduler") starts every error."""
    try:
        target, attr = split_spec(spec)
    except UserCodeError as exc:
        raise UserCodeError(f"{what} {exc}") from None
    if is_file_target(target):
        module = load_user_file(target, what=what)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserCodeError(f"{what} {spec!r}: cannot import module {target!r}: {exc}") from exc
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UserCodeError(f"{what} {spec!r}: {target!r} has no attribute {attr!r} "
                            f"(it defines: {', '.join(public[:20])}{', ...' if len(public) > 20 else ''})")
    return getattr(module, attr)


def load_user_file(path: str, *, what: str = "user code"):
    """Import a Python file once per process under its stable module name."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{what} file {path!r} does not exist")
    name = user_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before executing: dataclasses and pickling look the module up
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def user_module_name(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    return f"megarl_user_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
