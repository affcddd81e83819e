"""rollout.on_engine_failure / rollout.max_engine_restarts: accepted, checked, and what the recipes use."""

import os

import pytest

from megarl.config import ConfigError, load_config

REQUIRED = {"model.path": "/models/m", "data.train_files": ["train.parquet"]}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _problems(overrides: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(None, {**REQUIRED, **overrides}, check_paths=False)
    return info.value.errors


def test_restart_and_its_budget_are_config_fields():
    cfg = load_config(None, {**REQUIRED, "rollout.on_engine_failure": "restart", "rollout.max_engine_restarts": 5},
                      check_paths=False)
    assert (cfg.rollout.on_engine_failure, cfg.rollout.max_engine_restarts) == ("restart", 5)
    default = load_config(None, REQUIRED, check_paths=False)
    assert (default.rollout.on_engine_failure, default.rollout.max_engine_restarts) == ("fail", 3)


def test_bad_values_are_named():
    (problem,) = _problems({"rollout.on_engine_failure": "retry"})
    assert "rollout.on_engine_failure" in problem and "fail" in problem and "restart" in problem
    (problem,) = _problems({"rollout.on_engine_failure": "restart", "rollout.max_engine_restarts": -1})
    assert problem == "rollout.max_engine_restarts: must be >= 0, got -1"
    (problem,) = _problems({"rollout.max_engine_restarts": 7})  # with fail it would do nothing: refused
    assert problem.startswith("rollout.max_engine_restarts: 7 has no effect with rollout.on_engine_failure=fail")


def test_the_235b_recipe_restarts_engines():
    cfg = load_config(os.path.join(ROOT, "configs", "qwen3_235b_a22b_grpo.yaml"), {"model.path": "/unused"}, check_paths=False)
    assert cfg.rollout.on_engine_failure == "restart" and cfg.rollout.max_engine_restarts == 8


def test_engine_group_options_take_the_config_words():
    from megarl.rollout import EngineGroupOptions

    assert EngineGroupOptions(on_engine_failure="restart", max_restarts=2).max_restarts == 2
    with pytest.raises(ValueError, match="on_engine_failure must be fail|restart, got 'raise'"):
        EngineGroupOptions(on_engine_failure="raise")
    with pytest.raises(ValueError, match="max_restarts must be >= 0"):
        EngineGroupOptions(max_restarts=-1)
