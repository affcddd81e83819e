"""The one registry class and the one user-code loader every extension point uses."""

import os
import pickle
import subprocess
import sys

import pytest

from megarl.utils.registry import Registry, UnknownNameError
from megarl.utils.user_code import UserCodeError, load_user_object, user_module_name


def test_registry_lookup_aliases_and_conflicts():
    reg = Registry("toy", hint="(or path.py:fn)")

    @reg.register("a", aliases=("alpha",))
    def a():
        return 1

    assert reg.get("alpha") is a and "a" in reg and "b" not in reg and reg.names() == ["a", "alpha"]
    with pytest.raises(UnknownNameError) as info:
        reg.get("b")
    assert str(info.value) == "unknown toy 'b'; registered: a, alpha (or path.py:fn)"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    reg.register("a")(a)  # the same object again: allowed
    with pytest.raises(ValueError, match="toy 'a' is already registered as .*test_registry_lookup"):
        reg.register("a")(lambda: 2)


def test_registry_imports_its_builtins_at_first_lookup():
    from megarl.rewards.registry import REWARDS
    from megarl.rollout.multi_turn import SCHEDULERS
    from megarl.rollout.weight_sync.base import TRANSPORTS

    assert {"math", "gsm8k", "default"} <= set(REWARDS.names())
    assert TRANSPORTS.names() == ["cuda_ipc", "inline", "nccl", "object_store"]
    assert "single_turn" in SCHEDULERS


def test_every_registry_in_megarl_is_the_one_class():
    import megarl.algorithms as algorithms
    from megarl.rewards import registry as rewards
    from megarl.rollout import multi_turn
    from megarl.rollout.weight_sync import base

    registries = [algorithms.ADVANTAGE_ESTIMATORS, algorithms.POLICY_LOSSES, algorithms.KL_ESTIMATORS,
                  algorithms.LOSS_AGG_MODES, algorithms.DPO_LOSSES, rewards.REWARDS, multi_turn.SCHEDULERS,
                  base.TRANSPORTS]
    assert all(type(r) is Registry for r in registries)


USER_FILE = '''
import dataclasses

@dataclasses.dataclass
class Point:
    x: int

def make(x):
    return Point(x)
'''


def test_user_file_loads_once_under_a_name_stable_across_processes(tmp_path):
    path = tmp_path / "my code.py"
    path.write_text(USER_FILE)
    make = load_user_object(f"{path}:make")
    assert load_user_object(f"{path}:make") is make  # loaded once per process
    name = user_module_name(str(path))
    assert make.__module__ == name and name.startswith("megarl_user_my_code_")
    other = subprocess.run([sys.executable, "-c", f"from megarl.utils.user_code import user_module_name; "
                            f"print(user_module_name({str(path)!r}))"], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == name
    assert pickle.loads(pickle.dumps(make(3))) == make(3)  # a dataclass defined there pickles by reference


def test_user_code_errors_say_what_is_missing(tmp_path):
    path = tmp_path / "code.py"
    path.write_text(USER_FILE)
    with pytest.raises(FileNotFoundError, match="custom reward file .*nope.py' does not exist"):
        load_user_object(f"{tmp_path}/nope.py:fn", what="custom reward")
    with pytest.raises(UserCodeError, match=r"has no attribute 'mak' \(it defines: Point, dataclasses, make\)"):
        load_user_object(f"{path}:mak")
    with pytest.raises(UserCodeError, match="cannot import module 'no_such_pkg_xyz'"):
        load_user_object("no_such_pkg_xyz:fn")
    with pytest.raises(UserCodeError, match="must look like path/to/file.py:name"):
        load_user_object(":fn")
    assert load_user_object("os.path:join") is os.path.join
