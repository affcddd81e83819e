"""The verl-0.9.1 loss options: typed in the config, mapped to PolicyLossOptions, their relations refused
at load time with one message each."""

import pytest

from megarl.algorithms import PolicyLossOptions
from megarl.config import ConfigError, load_config
from megarl.trainer.train_worker import policy_loss_options

REQUIRED = {"model.path": "/models/m", "data.train_files": ["train.parquet"]}


def _load(overrides: dict):
    return load_config(None, {**REQUIRED, **overrides}, check_paths=False)


def _problem(overrides: dict) -> str:
    with pytest.raises(ConfigError) as info:
        _load(overrides)
    (msg,) = info.value.errors
    return msg


def test_loss_options_reach_the_policy_loss_options():
    cfg = _load({"algorithm.policy_loss": "bypass_mode", "algorithm.bypass_loss_type": "reinforce",
                 "algorithm.tis.is_cap": 1.5, "algorithm.tau_neg": 2.0, "algorithm.kl_cov_ratio": 0.01,
                 "algorithm.dro_beta": 0.3, "algorithm.loss_agg_mode": "token-sum", "algorithm.kl_loss_type": "k3+"})
    options = policy_loss_options(cfg)
    assert isinstance(options, PolicyLossOptions)
    assert (options.policy_loss, options.bypass_loss_type, options.rollout_correction.is_cap) == ("bypass_mode", "reinforce", 1.5)
    assert (options.tau_neg, options.kl_cov_ratio, options.dro_beta) == (2.0, 0.01, 0.3)
    assert (options.loss_agg_mode, options.kl_loss_type) == ("token-sum", "k3+")


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm.tau_pos": 0.0}, "algorithm.tau_pos: the SAPO gate temperature must be > 0, got 0.0"),
    ({"algorithm.clip_cov_ratio": 0.0}, "algorithm.clip_cov_ratio: a fraction of the loss tokens, must be in (0, 1], got 0.0"),
    ({"algorithm.kl_cov_ratio": 2.0}, "algorithm.kl_cov_ratio: a fraction of the loss tokens, must be in (0, 1], got 2.0"),
    ({"algorithm.clip_cov_lb": 6.0}, "algorithm.clip_cov_lb: must be < clip_cov_ub, got 6.0 >= 5.0"),
    ({"algorithm.dro_beta": -0.1}, "algorithm.dro_beta: must be >= 0, got -0.1"),
])
def test_loss_option_ranges(overrides, message):
    assert _problem(overrides) == message


def test_bypass_ppo_clip_refuses_an_is_weight():
    msg = _problem({"algorithm.policy_loss": "bypass_mode", "algorithm.tis.is_cap": 2.0})
    assert msg.startswith("algorithm.tis.is_cap: bypass_mode with bypass_loss_type=ppo_clip already corrects")


def test_bypass_refuses_rollout_log_probs_of_a_truncated_distribution():
    msg = _problem({"algorithm.policy_loss": "bypass_mode", "rollout.top_p": 0.9})
    assert msg.startswith("algorithm.policy_loss: bypass_mode uses the rollout engine's log-probs as the old policy, "
                          "which with rollout.top_p=0.9 / top_k=-1")


def test_bypass_loss_type_is_typed():
    with pytest.raises(ConfigError, match="bypass_loss_type"):
        _load({"algorithm.bypass_loss_type": "a2c"})


def test_pass_at_k_needs_groups():
    msg = _problem({"algorithm.adv_estimator": "grpo_passk", "rollout.n": 1})
    assert msg.startswith("rollout.n: grpo_passk compares responses within a prompt group")


def test_optimal_token_baseline_needs_groups():
    msg = _problem({"algorithm.adv_estimator": "tir_optimal_token_baseline", "rollout.n": 1})
    assert msg.startswith("rollout.n: tir_optimal_token_baseline baselines each position with the other responses")


def test_new_names_are_accepted():
    for overrides in ({"algorithm.policy_loss": "gmpo"}, {"algorithm.adv_estimator": "remax", "rollout.n": 1},
                      {"algorithm.adv_estimator": "opo"}, {"algorithm.kl_loss_type": "low_var_kl+"},
                      {"algorithm.adv_estimator": "optimal_token_baseline"}):
        _load(overrides)
