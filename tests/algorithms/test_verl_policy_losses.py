"""The policy losses added for verl 0.9.1 users, against naive token-by-token implementations written
here from each paper's formula (Python floats for the non-differentiable parts, torch scalars for the
differentiable ones), on uneven masks; loss values and torch.autograd gradients must agree."""

import math

import pytest
import torch

from megarl.algorithms import (
    PolicyLossOptions,
    RolloutCorrectionOptions,
    compute_loss_normalisers,
    compute_policy_loss,
    prepare_policy_loss_inputs,
)

# 4 rows, uneven responses (1, 3, 5 and 4 tokens) after prompts of different lengths
MASK = torch.tensor([
    [0, 0, 1, 0, 0, 0, 0],
    [0, 1, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 1, 1, 1, 1],
], dtype=torch.float64)


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(MASK.shape, generator=g, dtype=torch.float64) * 2 - 0.05
    log_prob = (old + 0.4 * torch.randn(MASK.shape, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.3 * torch.randn(MASK.shape, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    adv = torch.tensor([1.5, -0.7, 0.9, -1.2], dtype=torch.float64).unsqueeze(-1).expand_as(MASK).clone()
    adv[2, 3] = -0.4  # a token-level advantage of the other sign inside a row
    log_prob[2, 4] = old[2, 4] - 0.8  # a positive-advantage token whose probability fell far
    return log_prob, old, rollout, adv


def tokens():
    return [(b, t) for b in range(MASK.shape[0]) for t in range(MASK.shape[1]) if MASK[b, t] > 0]


def run(options, log_prob, old, adv, rollout=None):
    lp = log_prob.clone().requires_grad_(True)
    norm = compute_loss_normalisers(MASK, max_response_length=MASK.shape[1])
    inputs = prepare_policy_loss_inputs(options, old, adv, MASK)
    loss, metrics = compute_policy_loss(lp, old, adv, MASK, norm, options, rollout_log_prob=rollout,
                                        mini_batch_inputs=inputs)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def naive_token_mean(per_token, log_prob):
    """Sum of per_token(lp_t, b, t) over the loss tokens / their count, with autograd gradients."""
    lp = log_prob.clone().requires_grad_(True)
    total = sum(per_token(lp[b, t], b, t) for b, t in tokens()) / len(tokens())
    total.backward()
    return total.detach(), lp.grad


def check(options, per_token, rollout=None, seed=0):
    log_prob, old, rollout_lp, adv = make_inputs(seed)
    loss, grad, metrics = run(options, log_prob, old, adv, rollout_lp if rollout else None)
    ref_loss, ref_grad = naive_token_mean(lambda lp, b, t: per_token(lp, float(old[b, t]), float(adv[b, t]),
                                                                     float(rollout_lp[b, t]), b, t), log_prob)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)
    assert grad.abs().sum() > 0
    return metrics


def test_cispo_clips_the_weight_and_keeps_every_gradient():
    opts = PolicyLossOptions(policy_loss="cispo", clip_ratio_low=0.2, clip_ratio_high=0.28)

    def per_token(lp, old, a, _r, b, t):
        ratio = math.exp(float(lp) - old)
        return -min(max(ratio, 0.8), 1.28) * a * lp

    metrics = check(opts, per_token)
    assert metrics["pg_clipfrac"] > 0  # some weights are clipped, yet (check) every token has a gradient


def test_sapo_gate_with_two_temperatures():
    opts = PolicyLossOptions(policy_loss="sapo", tau_pos=1.0, tau_neg=2.5)

    def per_token(lp, old, a, _r, b, t):
        tau = 1.0 if a > 0 else 2.5
        ratio = torch.exp(lp - old)
        return -a * (4.0 / tau) / (1.0 + torch.exp(-tau * (ratio - 1.0)))

    check(opts, per_token)


def test_sapo_gradient_at_ratio_one_is_the_policy_gradient():
    # f'(1) = 4/tau * tau * sigmoid'(0) = 1: at r = 1 SAPO's gradient is PPO's, -A per token (token-mean)
    opts = PolicyLossOptions(policy_loss="sapo", tau_pos=3.0, tau_neg=7.0)
    _, old, _, adv = make_inputs()
    _, grad, _ = run(opts, old.clone(), old, adv)
    torch.testing.assert_close(grad, -adv * MASK / MASK.sum(), rtol=0, atol=1e-12)


def test_dppo_tv_masks_tokens_outside_the_probability_band():
    opts = PolicyLossOptions(policy_loss="dppo_tv", clip_ratio_low=0.05, clip_ratio_high=0.08, clip_ratio_c=1.5)

    def per_token(lp, old, a, _r, b, t):
        p, q = math.exp(float(lp)), math.exp(old)
        valid = (p - q <= 0.08) if a > 0 else (p - q >= -0.05)
        return -a * min(p / q, 1.5) * lp * float(valid)

    metrics = check(opts, per_token)
    assert 0 < metrics["pg_clipfrac"] < 1


def test_dppo_kl_masks_by_binary_kl_in_the_pushed_direction():
    opts = PolicyLossOptions(policy_loss="dppo_kl", clip_ratio_low=0.01, clip_ratio_high=0.02, clip_ratio_c=None)

    def per_token(lp, old, a, _r, b, t):
        p, q = math.exp(float(lp)), math.exp(old)
        kl = q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
        valid = (kl <= 0.02 or p <= q) if a > 0 else (kl <= 0.01 or p >= q)
        return -a * (p / q) * lp * float(valid)

    metrics = check(opts, per_token)
    assert 0 < metrics["pg_clipfrac"] < 1
    # both "moved against the advantage" exemptions occur: beyond the KL bound, yet valid
    log_prob, old, _, adv = make_inputs()
    p, q = log_prob.exp(), old.exp()
    kl = q * (old - log_prob) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
    assert bool((MASK.bool() & (adv > 0) & (p <= q) & (kl > 0.02)).any())
    assert bool((MASK.bool() & (adv < 0) & (p >= q) & (kl > 0.01)).any())


@pytest.mark.parametrize("name", ["reinforce", "gpg"])
def test_reinforce_and_gpg_are_minus_advantage_times_log_prob(name):
    check(PolicyLossOptions(policy_loss=name), lambda lp, old, a, _r, b, t: -a * lp)


def test_dro_quadratic_penalty():
    check(PolicyLossOptions(policy_loss="dro", dro_beta=0.7),
          lambda lp, old, a, _r, b, t: -(a * lp - 0.35 * (lp - old) ** 2))


def _ppo_token(lp, old, a, low=0.2, high=0.2, c=3.0):
    ratio = torch.exp(lp - old)
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - low, 1 + high))
    return torch.minimum(surrogate, torch.tensor(-a * c, dtype=lp.dtype)) if a < 0 else surrogate


def test_bypass_ppo_clip_uses_the_rollout_log_probs_as_old_policy():
    opts = PolicyLossOptions(policy_loss="bypass_mode", clip_ratio_high=0.28)
    check(opts, lambda lp, old, a, rollout, b, t: _ppo_token(lp, rollout, a, high=0.28), rollout=True)


def test_bypass_reinforce_truncates_pi_over_pi_rollout():
    opts = PolicyLossOptions(policy_loss="bypass_mode", bypass_loss_type="reinforce",
                             rollout_correction=RolloutCorrectionOptions(is_cap=1.1))

    def per_token(lp, old, a, rollout, b, t):
        return -min(math.exp(float(lp) - rollout), 1.1) * a * lp

    metrics = check(opts, per_token, rollout=True)
    assert metrics["pg_clipfrac"] > 0  # some weights hit the cap


def test_bypass_refuses_a_double_is_weight_and_a_missing_rollout():
    with pytest.raises(ValueError, match="would count it twice"):
        PolicyLossOptions(policy_loss="bypass_mode", rollout_correction=RolloutCorrectionOptions(is_cap=2.0))
    log_prob, old, _, adv = make_inputs()
    with pytest.raises(ValueError, match="pass rollout_log_prob"):
        run(PolicyLossOptions(policy_loss="bypass_mode"), log_prob, old, adv)


def test_geo_mean_is_minus_mean_advantage_times_geometric_mean_ratio():
    opts = PolicyLossOptions(policy_loss="geo_mean", clip_ratio=0.3, loss_agg_mode="seq-mean-token-mean")
    log_prob, old, _, adv = make_inputs()
    loss, grad, metrics = run(opts, log_prob, old, adv)

    lp = log_prob.clone().requires_grad_(True)
    per_sequence = []
    for b in range(MASK.shape[0]):
        ts = [t for t in range(MASK.shape[1]) if MASK[b, t] > 0]
        clipped_logs = []
        for t in ts:
            a, d = float(adv[b, t]), lp[b, t] - old[b, t]
            s = (a > 0) - (a < 0)
            clipped_logs.append(s * torch.minimum(s * d, s * d.clamp(-0.3, 0.3)))
        ratio = torch.exp(sum(clipped_logs) / len(ts))
        per_sequence.append(-(sum(float(adv[b, t]) for t in ts) / len(ts)) * ratio)
    ref = sum(per_sequence) / len(per_sequence)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, lp.grad, rtol=0, atol=1e-10)
    assert metrics["pg_clipfrac"] + metrics["pg_clipfrac_lower"] > 0
    # gmpo is the literature's name for the same loss
    loss2, grad2, _ = run(PolicyLossOptions(policy_loss="gmpo", clip_ratio=0.3, loss_agg_mode="seq-mean-token-mean"),
                          log_prob, old, adv)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)


def _covariances(old, adv):
    ts = tokens()
    a_mean = sum(float(adv[b, t]) for b, t in ts) / len(ts)
    l_mean = sum(float(old[b, t]) for b, t in ts) / len(ts)
    return {(b, t): (float(adv[b, t]) - a_mean) * (float(old[b, t]) - l_mean) for b, t in ts}


def test_kl_cov_penalises_the_top_covariance_tokens():
    opts = PolicyLossOptions(policy_loss="kl_cov", kl_cov_ratio=0.25, ppo_kl_coef=0.5)
    log_prob, old, _, adv = make_inputs()
    cov = _covariances(old, adv)
    k = max(int(0.25 * len(cov)), 1)
    top = set(sorted(cov, key=cov.get, reverse=True)[:k])
    metrics = check(opts, lambda lp, o, a, _r, b, t: -a * torch.exp(lp - o) + 0.5 * (lp - o).abs() * ((b, t) in top))
    assert metrics["pg_clipfrac"] == pytest.approx(k / len(cov), abs=1e-12)


def test_clip_cov_removes_the_gradient_of_band_tokens_not_clipped_by_ppo():
    # band and ratio chosen so that every candidate is picked (k >= candidates): the pick is deterministic
    opts = PolicyLossOptions(policy_loss="clip_cov", clip_ratio=0.2, clip_cov_ratio=0.9, clip_cov_lb=0.0,
                             clip_cov_ub=0.5)
    log_prob, old, _, adv = make_inputs()
    cov = _covariances(old, adv)
    band = {key for key, c in cov.items() if 0.0 < c < 0.5}
    assert 0 < len(band) <= int(0.9 * len(cov))

    def per_token(lp, o, a, _r, b, t):
        ratio = math.exp(float(lp) - o)
        by_ratio = -a * min(max(ratio, 0.8), 1.2) > -a * ratio
        surrogate = torch.maximum(-a * torch.exp(lp - o), -a * torch.exp(lp - o).clamp(0.8, 1.2))
        return surrogate * (0.0 if (b, t) in band and not by_ratio else 1.0)

    check(opts, per_token)


def test_clip_cov_picks_exactly_k_band_tokens_and_the_same_ones_every_time():
    opts = PolicyLossOptions(policy_loss="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    _, old, _, adv = make_inputs()
    first = prepare_policy_loss_inputs(opts, old, adv, MASK)["cov_selected"]
    assert first.sum() == max(int(0.1 * MASK.sum()), 1) and bool((first <= MASK).all())
    assert torch.equal(prepare_policy_loss_inputs(opts, old, adv, MASK)["cov_selected"], first)


def test_covariance_losses_refuse_to_run_without_their_mini_batch_selection():
    log_prob, old, _, adv = make_inputs()
    norm = compute_loss_normalisers(MASK)
    with pytest.raises(ValueError, match="call prepare_policy_loss_inputs on the whole mini-batch"):
        compute_policy_loss(log_prob, old, adv, MASK, norm, PolicyLossOptions(policy_loss="kl_cov"))


@pytest.mark.parametrize("field, value, message", [
    ("tau_pos", 0.0, "SAPO gate temperature"),
    ("clip_cov_ratio", 0.0, "fraction of loss tokens"),
    ("kl_cov_ratio", 1.5, "fraction of loss tokens"),
    ("clip_cov_lb", 9.0, "clip_cov_lb must be < clip_cov_ub"),
    ("dro_beta", -1.0, "dro_beta must be >= 0"),
    ("bypass_loss_type", "a2c", "unknown bypass_loss_type 'a2c'"),
])
def test_loss_options_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        PolicyLossOptions(**{field: value})
