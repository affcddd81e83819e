"""KL estimators, the KL reward penalty and controllers, loss aggregation modes, registry errors."""

import math

import pytest
import torch

from megarl.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    KLRewardOptions,
    LossNormalisers,
    PolicyLossOptions,
    aggregate_loss,
    apply_kl_penalty,
    compute_loss_normalisers,
    kl_divergence,
)

LOG_PROB = torch.tensor([[0.0, -1.0, -2.0, -30.0, 0.0]])
REF = torch.tensor([[-0.5, -1.0, -1.0, 0.0, -30.0]])  # delta = lp - ref = 0.5, 0, -1, -30, 30


@pytest.mark.parametrize(
    "name, expected",
    [
        ("k1", [0.5, 0.0, -1.0, -30.0, 30.0]),
        ("kl", [0.5, 0.0, -1.0, -30.0, 30.0]),
        ("abs", [0.5, 0.0, 1.0, 30.0, 30.0]),
        ("k2", [0.125, 0.0, 0.5, 450.0, 450.0]),
        ("mse", [0.125, 0.0, 0.5, 450.0, 450.0]),
        # exp(-d) + d - 1; d = -30: log-ratio clamped to 20, e^20 - 21 -> value clamp 10;
        # d = 30: log-ratio clamped to -20: e^-20 + 19 -> 10
        ("k3", [math.exp(-0.5) - 0.5, 0.0, math.e - 2, 10.0, 10.0]),
        ("low_var_kl", [math.exp(-0.5) - 0.5, 0.0, math.e - 2, 10.0, 10.0]),
    ],
)
def test_kl_estimators(name, expected):
    torch.testing.assert_close(kl_divergence(LOG_PROB, REF, name), torch.tensor([expected]), rtol=1e-6, atol=1e-6)


def test_unknown_kl_estimator_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"registered: abs, abs\+, k1, k1\+, k2, k3, k3\+, kl, kl\+, low_var_kl, low_var_kl\+, mse"):
        kl_divergence(LOG_PROB, REF, "k4")


def test_kl_reward_penalty_with_fixed_and_adaptive_controllers():
    scores = torch.tensor([[0, 0, 0, 2.0], [0, 0, 3.0, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    old = torch.tensor([[5.0, -1.0, -1.0, -1.0], [5.0, -2.0, -2.0, 7.0]])
    ref = torch.tensor([[0.0, -1.2, -1.0, -0.7], [0.0, -2.0, -2.4, 0.0]])
    # k1 on response tokens: row 0: 0.2, 0, -0.3 (mean -1/30); row 1: 0, 0.4 (mean 0.2)
    rewards, metrics = apply_kl_penalty(scores, old, ref, mask, FixedKLController(0.1))
    expected = torch.tensor([[0, -0.02, 0, 2.03], [0, 0, 3.0 - 0.04, 0]])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    assert metrics["actor/reward_kl_penalty"] == pytest.approx((-0.1 / 3 + 0.2) / 2, abs=1e-6)
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.1

    adaptive = AdaptiveKLController(init_coef=0.1, target_kl=0.05, horizon=100)
    adaptive.update(current_kl=0.1, n_steps=2)  # error clip(2 - 1) = 0.2 -> x(1 + 0.2 * 2 / 100)
    assert adaptive.value == pytest.approx(0.1 * 1.004)
    adaptive.update(current_kl=0.04, n_steps=10)  # error -0.2 -> x(1 - 0.02)
    assert adaptive.value == pytest.approx(0.1 * 1.004 * 0.98)
    assert isinstance(KLRewardOptions(type="adaptive").make_controller(), AdaptiveKLController)
    with pytest.raises(ValueError, match="registered: adaptive, fixed"):
        KLRewardOptions(type="pid")


# Aggregation: rows with 3, 1 and 0 loss tokens; values under mask 0 (9s) must be ignored.
VALUES = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-sum", (6 + 4) / 2),
        ("seq-mean-token-mean", (2 + 4) / 2),
        ("seq-mean-token-sum-norm", (6 + 4) / (2 * 8)),
    ],
)
def test_aggregation_modes(mode, expected):
    norm = compute_loss_normalisers(MASK, max_response_length=8)
    assert (norm.num_tokens, norm.num_sequences, norm.max_response_length) == (4, 2, 8)
    assert aggregate_loss(VALUES, MASK, mode, norm).item() == pytest.approx(expected)


def test_normalisers_are_global_not_per_micro_batch():
    # the first row alone, against the normalisers of the whole batch: its share of token-mean
    norm = LossNormalisers(num_tokens=4, num_sequences=2)
    assert aggregate_loss(VALUES[:1], MASK[:1], "token-mean", norm).item() == pytest.approx(6 / 4)
    assert aggregate_loss(VALUES[:1], MASK[:1], "seq-mean-token-mean", norm).item() == pytest.approx(2 / 2)


def test_masked_non_finite_values_do_not_poison_the_loss():
    values = torch.tensor([[1.0, float("-inf"), float("nan")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    loss = aggregate_loss(values, mask, "token-mean")
    loss.backward()
    assert loss.item() == 1.0 and values.grad.tolist() == [[1.0, 0.0, 0.0]]


def test_sum_norm_needs_max_response_length_and_empty_batch_gives_zero():
    with pytest.raises(ValueError, match="max_response_length"):
        aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", LossNormalisers(4, 2))
    empty = torch.zeros(2, 3)
    assert aggregate_loss(torch.ones(2, 3), empty, "token-mean", LossNormalisers(0, 0)).item() == 0.0


def test_option_validation_lists_registered_names_before_any_work():
    with pytest.raises(ValueError, match="unknown policy loss .ppo2.; registered: bypass, bypass_mode, cispo, clip_cov, dppo_kl, dppo_tv, dro, geo_mean, gmpo, gpg, gspo, kl_cov, ppo, reinforce, sapo, vanilla"):
        PolicyLossOptions(policy_loss="ppo2")
    with pytest.raises(ValueError, match="registered: seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, token-mean"):
        PolicyLossOptions(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="unknown kl estimator 'k5'"):
        PolicyLossOptions(kl_loss_type="k5")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        PolicyLossOptions(clip_ratio_c=0.9)
    with pytest.raises(ValueError, match="clip ratios"):
        PolicyLossOptions(clip_ratio_low=1.2)
    opts = PolicyLossOptions(clip_ratio=0.2, clip_ratio_high=0.28, rollout_correction={"is_cap": 2.0})
    assert (opts.clip_low, opts.clip_high, opts.rollout_correction.is_cap) == (0.2, 0.28, 2.0)


def test_options_from_the_config_tree():
    from megarl.algorithms import AdvantageOptions
    from megarl.config.schema import AlgorithmConfig, TISConfig

    cfg = AlgorithmConfig(policy_loss="gspo", clip_ratio_high=0.28, loss_agg_mode="seq-mean-token-mean",
                          use_kl_loss=True, kl_loss_type="k2", norm_adv_by_std=False, gamma=0.9,
                          tis=TISConfig(level="sequence", is_cap=2.0, reject_above=5.0))
    opts = PolicyLossOptions.from_config(cfg)
    assert (opts.policy_loss, opts.clip_high, opts.loss_agg_mode, opts.kl_loss_type) == ("gspo", 0.28, "seq-mean-token-mean", "k2")
    assert (opts.rollout_correction.level, opts.rollout_correction.is_cap, opts.rollout_correction.reject_above) == ("sequence", 2.0, 5.0)
    adv = AdvantageOptions.from_config(cfg)
    assert (adv.norm_adv_by_std, adv.gamma) == (False, 0.9)
    kl = KLRewardOptions(**vars(cfg.kl_ctrl))
    assert isinstance(kl.make_controller(), FixedKLController)
