"""YAML/CLI → typed config: every problem is reported by field name, values are typed by the schema."""

import pytest

from megarl.config import ConfigError, MegaRLConfig, build_config, from_dict, load_config, parse_cli, to_yaml
from megarl.config.loader import read_yaml

REQUIRED = {"model.path": "/models/m", "data.train_files": ["train.parquet"]}


def _load(overrides: dict) -> MegaRLConfig:
    return load_config(None, {**REQUIRED, **overrides}, check_paths=False)


def _problems(overrides: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(overrides)
    return info.value.errors


def test_defaults_resolve_derived_fields():
    cfg = _load({"parallel.tp": 4})
    assert cfg.parallel.etp == 4 and cfg.parallel.sequence_parallel is True
    assert cfg.algorithm.clip_ratio_low == 0.2 and cfg.algorithm.clip_ratio_high == 0.2
    assert cfg.model.ref_path == "/models/m" and cfg.model.tokenizer_path == "/models/m"
    assert cfg.rollout.num_engines == 8  # 1 node x 8 GPUs / rollout TP 1
    assert cfg.actor.log_prob_max_token_len_per_gpu == cfg.actor.max_token_len_per_gpu
    assert cfg.trainer.output_dir == "outputs/megarl"


def test_unknown_key_is_named_with_suggestion():
    (msg,) = _problems({"rollout.temprature": 0.7})
    assert msg.startswith("rollout.temprature: unknown key; did you mean 'temperature'?")
    (msg,) = _problems({"algoritm.use_kl_loss": True})
    assert msg.startswith("algoritm: unknown key; did you mean 'algorithm'?")


def test_wrong_type_is_named():
    problems = _problems({"parallel.tp": "4", "actor.use_dynamic_bsz": 1, "optimizer.lr": "fast"})
    assert problems == [
        "parallel.tp: expected an integer, got '4' (str)",
        "actor.use_dynamic_bsz: expected a boolean (true/false), got 1 (int)",
        "optimizer.lr: expected a number, got 'fast' (str)",
    ]


def test_bad_enum_value_lists_choices_and_suggests():
    (msg,) = _problems({"rollout.placement": "colocate"})
    assert msg == ("rollout.placement: 'colocate' is not one of 'colocated', 'disaggregated' "
                   "(did you mean 'colocated'?)")
    (msg,) = _problems({"trainer.logger": ["console", "wandb"]})
    assert msg.startswith("trainer.logger[1]: 'wandb' is not one of 'console', 'tensorboard'")


def test_registry_names_are_checked():
    (msg,) = _problems({"algorithm.adv_estimator": "grpoo"})
    assert msg.startswith("algorithm.adv_estimator: 'grpoo' is not registered; registered: ")
    assert "grpo" in msg and "rloo" in msg
    (msg,) = _problems({"algorithm.kl_loss_type": "low_var"})
    assert msg.startswith("algorithm.kl_loss_type: 'low_var' is not registered")
    (msg,) = _problems({"reward.name": ["math", "nope"]})
    assert msg.startswith("reward.name: 'nope' is not registered")
    # user code by path is accepted here and loaded when the run starts
    assert _load({"reward.name": "my_rewards.py:score"}).reward.terms() == [("my_rewards.py:score", 1.0)]


def test_missing_model_path():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"data.train_files": ["x"]}, check_paths=False)
    assert info.value.errors == [
        "model.path: required; set it to a HuggingFace model folder (config.json + *.safetensors + tokenizer), "
        "e.g. --model.path=/models/Qwen3-30B-A3B"
    ]


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"rollout.n": "many", "parallel.cp": 0}, check_paths=False)
    # type errors stop before the relation checks (parallel.cp=0 is a well-typed int)
    assert str(info.value) == "invalid config (1 problem):\n  - rollout.n: expected an integer, got 'many' (str)"
    problems = _problems({"parallel.cp": 0, "rollout.n": 1, "data.train_batch_size": 30})
    assert "parallel.cp: must be > 0, got 0" in problems
    assert any(p.startswith("rollout.n: grpo compares responses within a prompt group") for p in problems)
    assert "actor.ppo_mini_batch_size: 64 prompts exceeds data.train_batch_size 30" in problems


def test_relations_between_fields():
    problems = _problems({
        "optimizer.optimizer_offload_fraction": 0.5,
        "parallel.recompute.granularity": "full",
        "actor.use_dynamic_bsz": True, "actor.max_token_len_per_gpu": 1000,
        "rollout.max_turns": 3,
    })
    assert any(p.startswith("optimizer.optimizer_offload_fraction: > 0 has no effect without") for p in problems)
    assert "parallel.recompute.method: required with granularity=full (uniform or block)" in problems
    assert any(p.startswith("actor.max_token_len_per_gpu: 1000 tokens cannot hold one sequence of up to 2048")
               for p in problems)
    assert any(p.startswith("rollout.max_turns: 3 > 1, but the RL loop does not run multi-turn rollouts yet")
               for p in problems)


def test_paths_are_checked_when_asked(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, {"model.path": str(tmp_path), "data.train_files": [str(tmp_path / "t.parquet")]})
    assert info.value.errors == [
        f"model.path: {str(tmp_path)!r} has no config.json (expected a HuggingFace model folder)",
        f"data.train_files[0]: {str(tmp_path / 't.parquet')!r} does not exist",
    ]


def test_cli_text_is_parsed_by_field_type():
    args = parse_cli([
        "--tp", "4", "--rollout.n=16", "--optimizer.lr", "2e-6", "--trainer.logger=[console]",
        "--reward.name=[math,format]", "--reward.weights=0.9,0.1", "--parallel.vpp=null",
        "--actor.use_dynamic_bsz=true", "--rollout-tp=2", "--nnodes", "2", "--gpus-per-node=4",
        "data.train_files=[a.parquet,b.parquet]", "--model.path=/m", "--dry-run",
    ])
    assert args.dry_run and args.config_path is None
    cfg, _ = build_config(None, args.overrides, check_paths=False)
    assert (cfg.parallel.tp, cfg.rollout.n, cfg.optimizer.lr) == (4, 16, 2e-6)
    assert cfg.trainer.logger == ["console"]
    assert cfg.reward.terms() == [("math", 0.9), ("format", 0.1)]
    assert cfg.parallel.vpp is None and cfg.actor.use_dynamic_bsz is True
    assert (cfg.rollout.tensor_parallel_size, cfg.trainer.nnodes, cfg.trainer.gpus_per_node) == (2, 2, 4)
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.rollout.num_engines == 4  # 8 GPUs / rollout TP 2


def test_cli_overrides_apply_in_order_and_beat_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: /m}\ndata: {train_files: x.parquet}\nparallel: {tp: 2}\noptimizer: {lr: 1e-6}\n")
    args = parse_cli(["--config", str(recipe), "--parallel.tp=8", "--tp", "4"])
    cfg, _ = build_config(args.config_path, args.overrides, check_paths=False)
    assert cfg.parallel.tp == 4
    assert cfg.optimizer.lr == 1e-6  # PyYAML reads `1e-6` as a string; float fields accept it
    assert cfg.data.train_files == ["x.parquet"]  # a single value where a list is expected


def test_cli_rejects_unknown_flags_and_bad_text():
    with pytest.raises(ConfigError) as info:
        parse_cli(["--rollout_tp", "4"])
    assert info.value.errors[0].startswith("--rollout_tp: unrecognised argument")
    with pytest.raises(ConfigError) as info:
        parse_cli(["--actor.param_offload", "--dry-run", "--tp"])
    assert info.value.errors == ["--actor.param_offload: missing value (write --actor.param_offload=VALUE)",
                                 "--tp: missing value (write --tp=VALUE)"]
    with pytest.raises(ConfigError) as info:
        build_config(None, [("model.path", "/m"), ("data.train_files", "x"), ("parallel.tp", "four")],
                     check_paths=False)
    assert info.value.errors == ["parallel.tp: expected an integer, got 'four'"]


def test_resolved_yaml_round_trips(tmp_path):
    cfg = _load({"parallel.tp": 2, "reward.name": ["math", "format"], "reward.weights": [1.0, 0.5]})
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert from_dict(MegaRLConfig, read_yaml(str(path))) == cfg


def test_offload_switches_validate_without_a_warning():
    """They pass validation (the dry-run planner counts them); a run refuses them at start
    (tests/config/test_schema_fields.py)."""
    from megarl.config import build_config

    _, warnings = build_config(None, [("model.path", "m"), ("data.train_files", "[t.parquet]"),
                                      ("actor.param_offload", "true"), ("actor.grad_offload", "true")],
                               check_paths=False)
    assert not any("offload" in w for w in warnings)


def test_ppo_selects_a_critic_and_gae():
    cfg = _load({"algorithm.name": "ppo", "actor.ppo_mini_batch_size": 32, "actor.micro_batch_size": 4})
    assert cfg.algorithm.adv_estimator == "gae"
    assert cfg.critic.path == "/models/m"  # the actor's weights + a fresh value head
    assert (cfg.critic.ppo_mini_batch_size, cfg.critic.micro_batch_size, cfg.critic.ppo_epochs) == (32, 4, 1)
    assert cfg.critic.optimizer.lr == 1e-5 and cfg.optimizer.lr == 1e-6  # its own optimizer
    assert _load({}).algorithm.adv_estimator == "grpo"


def test_critic_relations_are_checked():
    (msg,) = _problems({"algorithm.adv_estimator": "gae"})
    assert msg == "algorithm.adv_estimator: gae needs values from a critic; set algorithm.name=ppo (got name='grpo')"
    (msg,) = _problems({"algorithm.name": "ppo", "algorithm.adv_estimator": "grpo"})
    assert msg.startswith("algorithm.adv_estimator: algorithm.name=ppo trains a critic for GAE; 'grpo' would not use")
    (msg,) = _problems({"trainer.critic_warmup": 3})
    assert msg == "trainer.critic_warmup: only meaningful with algorithm.name=ppo"
    problems = _problems({"algorithm.name": "ppo", "critic.ppo_mini_batch_size": 48, "critic.cliprange_value": 0.0,
                          "critic.optimizer.adam_beta1": 1.0})
    assert problems == [
        "critic.optimizer.adam_beta1: must be in [0, 1), got 1.0",
        "critic.cliprange_value: must be > 0 (or null for no clipping), got 0.0",
        "critic.ppo_mini_batch_size: 48 does not divide data.train_batch_size 256 (both count prompts)",
    ]
    (msg,) = _problems({"algorithm.name": "ppo", "critic.loss_agg_mode": "token-median"})
    assert msg.startswith("critic.loss_agg_mode: 'token-median' is not registered")


def test_missing_critic_folder_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        load_config(None, {"model.path": str(tmp_path), "data.train_files": [str(tmp_path / "config.json")],
                           "algorithm.name": "ppo", "critic.path": str(tmp_path / "nope")})
    assert info.value.errors == [f"critic.path: {str(tmp_path / 'nope')!r} has no config.json (expected a HuggingFace model folder)"]
