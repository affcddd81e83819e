"""Every leaf field of MegaRLConfig is read by the code or refused by validation (never accepted and
ignored). Reads come from an AST scan of megarl/ and launch/ (tests/config/schema_reads.py); each
refused field has a test below that sets it and expects the error that names it."""

import dataclasses
import os

import pytest

from megarl.config import ConfigError, MegaRLConfig, load_config
from megarl.config.schema import RolloutConfig
from tests.config.schema_reads import config_reads, leaf_fields, python_files, unread_fields

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VALID = {"model.path": "/models/m", "data.train_files": ["t.parquet"]}

# Field -> (overrides that set it, the start of the error naming it). Refused at validation: the RL
# loop does not drive multi-turn rollouts yet (a later issue wires megarl.rollout.multi_turn in).
REFUSED = {
    "rollout.max_turns": ({"rollout.max_turns": 3}, "rollout.max_turns: 3 > 1, but the RL loop does not run multi-turn"),
    "rollout.multi_turn_scheduler": ({"rollout.multi_turn_scheduler": "tool_calls"},
                                     "rollout.multi_turn_scheduler: 'tool_calls' would not be used"),
}
# Refused when a run starts (validate.start_errors); a --dry-run plans with them.
REFUSED_AT_START = ("actor.param_offload", "actor.grad_offload", "actor.optimizer_offload")


def test_every_config_field_is_read_or_refused():
    reads = config_reads(MegaRLConfig)
    unread = unread_fields(MegaRLConfig, reads, allowed=set(REFUSED) | set(REFUSED_AT_START))
    assert unread == [], (f"config fields no code reads and no validation refuses: {unread}; read them where "
                          "they take effect, or refuse a non-default value in megarl/config/validate.py")
    assert len(leaf_fields(MegaRLConfig)) > 140  # the walk reaches the nested sections


@pytest.mark.parametrize("path", sorted(REFUSED))
def test_refused_fields_name_themselves(path):
    overrides, message = REFUSED[path]
    with pytest.raises(ConfigError) as err:
        load_config(None, {**VALID, **overrides}, check_paths=False)
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


@pytest.mark.parametrize("path", REFUSED_AT_START)
def test_offload_switches_are_refused_at_start_and_planned_by_a_dry_run(path):
    from megarl.config.validate import check_can_start

    cfg = load_config(None, {**VALID, path: True}, check_paths=False)  # validates: the planner counts it
    with pytest.raises(ConfigError) as err:
        check_can_start(cfg)
    assert err.value.errors == [f"{path}: the trainer does not move actor state to host memory between phases yet, "
                                "so this run would not get the memory the plan counts on; set it to false to run "
                                "(--dry-run plans with it)"]
    check_can_start(load_config(None, VALID, check_paths=False))


def _schema_with_a_dummy_field():
    """MegaRLConfig whose rollout section has one more field, `dummy_switch`, that no code reads."""
    rollout = dataclasses.make_dataclass("RolloutWithDummy", [("dummy_switch", bool, False)], bases=(RolloutConfig,))
    return dataclasses.make_dataclass(
        "ConfigWithDummy", [("rollout", rollout, dataclasses.field(default_factory=rollout))], bases=(MegaRLConfig,))


def test_the_walk_catches_an_unread_field_and_sees_a_read_one():
    schema = _schema_with_a_dummy_field()
    sources = {}
    for path in python_files():
        with open(path) as f:
            sources[path] = f.read()
    allowed = set(REFUSED) | set(REFUSED_AT_START)
    assert unread_fields(schema, config_reads(schema, sources), allowed) == ["rollout.dummy_switch"]
    sources["reader.py"] = "def engine_args(cfg):\n    r = cfg.rollout\n    return {'x': r.dummy_switch}\n"
    assert unread_fields(schema, config_reads(schema, sources), allowed) == []


@pytest.mark.parametrize("source", [
    "def f(cfg):\n    return cfg.rollout.dummy_switch\n",
    "def f(self):\n    return self.cfg.rollout.dummy_switch\n",
    "def from_config(cls, rollout):\n    return rollout.dummy_switch\n",
    "def f(cfg):\n    return getattr(cfg.rollout, 'dummy_switch')\n",
    "def f(cfg):\n    for name in ('n', 'dummy_switch'):\n        getattr(cfg.rollout, name)\n",
])
def test_the_reads_the_walk_recognises(source):
    schema = _schema_with_a_dummy_field()
    reads = config_reads(schema, {"reader.py": source})
    assert (schema.__dataclass_fields__["rollout"].type, "dummy_switch") in reads


def test_the_walk_does_not_count_writes_other_objects_or_validation_as_reads():
    schema = _schema_with_a_dummy_field()
    reads = config_reads(schema, {"w.py": "def f(cfg, other):\n    cfg.rollout.dummy_switch = True\n"
                                           "    return other.dummy_switch\n"})
    assert not any(name == "dummy_switch" for _, name in reads)
    scanned = {os.path.relpath(p, ROOT) for p in python_files()}
    assert "megarl/config/validate.py" not in scanned and "megarl/trainer/rl_trainer.py" in scanned
