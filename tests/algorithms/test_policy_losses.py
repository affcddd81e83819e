"""PPO (clip-higher, dual clip), GSPO, the on-policy point, entropy and KL terms, by hand."""

import math

import pytest
import torch

from megarl.algorithms import (
    LossNormalisers,
    PolicyLossOptions,
    compute_loss_normalisers,
    compute_policy_loss,
)

# Six loss tokens in two rows (old_log_prob = 0, so ratio r = exp(log_prob)), plus one masked token
# per row holding wild values (ratio e^30, advantage 100) that must not leak into loss or gradient.
#   token  A    r     -A*r   -A*clip(r,0.8,1.28)  max     dual (A<0: min with -A*3)
#   1      1    1.5   -1.5   -1.28                -1.28   clipped
#   2      1    0.5   -0.5   -0.8                 -0.5
#   3     -1    1.5    1.5    1.28                 1.5
#   4     -1    0.5    0.5    0.8                  0.8    clipped
#   5     -1    5.0    5.0    1.28                 5.0    -> 3 (dual clip)
#   6      2    1.0   -2.0   -2.0                 -2.0
RATIOS = torch.tensor([[1.5, 0.5, 1.5, math.exp(30)], [0.5, 5.0, 1.0, math.exp(30)]])
ADV = torch.tensor([[1.0, 1.0, -1.0, 100.0], [-1.0, -1.0, 2.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float32)
NORM = LossNormalisers(num_tokens=6, num_sequences=2, max_response_length=4)


def _ppo(options, ratios=RATIOS, adv=ADV, mask=MASK, norm=NORM, **kw):
    log_prob = ratios.log().clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(log_prob, torch.zeros_like(log_prob), adv, mask, norm, options, **kw)
    loss.backward()
    return loss, metrics, log_prob.grad


def test_ppo_clip_higher_with_dual_clip():
    options = PolicyLossOptions(clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    loss, metrics, grad = _ppo(options)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.5 + 0.8 + 3.0 - 2.0) / 6, abs=1e-6)
    assert metrics["pg_loss"].item() == pytest.approx(loss.item())
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 6)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 6)
    log_r = [math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), math.log(5.0), 0.0]
    assert metrics["ppo_kl"].item() == pytest.approx(-sum(log_r) / 6, abs=1e-6)
    # d(-A r)/d log r = -A r where the unclipped term is active; clipped and dual-clipped tokens: 0.
    expected = torch.tensor([[0, -0.5, 1.5, 0], [0, 0, -2.0, 0]]) / 6
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-7)


def test_ppo_without_dual_clip_and_symmetric_clip():
    options = PolicyLossOptions(clip_ratio=0.2, clip_ratio_c=None)
    loss, metrics, grad = _ppo(options)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 5.0 - 2.0) / 6, abs=1e-6)
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    expected = torch.tensor([[0, -0.5, 1.5, 0], [0, 5.0, -2.0, 0]]) / 6
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


def test_vanilla_is_an_alias_of_ppo():
    a = _ppo(PolicyLossOptions(policy_loss="vanilla"))[0]
    b = _ppo(PolicyLossOptions(policy_loss="ppo"))[0]
    assert a.item() == b.item()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_on_policy_loss_is_minus_aggregated_advantage_and_gradient_is_minus_a_over_normaliser(mode):
    # rows of 3, 1 and 2 loss tokens; a 4th row with no loss token does not count as a sequence
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([[9.0, 0.5, 0.5, 0.5, 9.0], [9.0, 9.0, 9.0, -2.0, 9.0], [9.0, 1.0, 3.0, 9.0, 9.0], [9.0] * 5])
    log_prob = torch.tensor([[-0.3, -1.2, -0.7, -2.0, -0.1]] * 4, requires_grad=True)
    norm = compute_loss_normalisers(mask, max_response_length=8)
    assert (norm.num_tokens, norm.num_sequences) == (6, 3)
    # per-token weight 1/denominator of each mode, written out
    per_seq_len = torch.tensor([3.0, 1.0, 2.0, 1.0]).unsqueeze(-1)
    weight = {
        "token-mean": torch.full((4, 1), 1 / 6),
        "seq-mean-token-sum": torch.full((4, 1), 1 / 3),
        "seq-mean-token-mean": 1 / (3 * per_seq_len),
        "seq-mean-token-sum-norm": torch.full((4, 1), 1 / (3 * 8)),
    }[mode] * mask
    expected_loss = {
        "token-mean": -(1.5 - 2.0 + 4.0) / 6,
        "seq-mean-token-sum": -(1.5 - 2.0 + 4.0) / 3,
        "seq-mean-token-mean": -(0.5 - 2.0 + 2.0) / 3,
        "seq-mean-token-sum-norm": -(1.5 - 2.0 + 4.0) / 24,
    }[mode]
    for policy_loss in ("ppo", "gspo"):
        log_prob.grad = None
        options = PolicyLossOptions(policy_loss=policy_loss, loss_agg_mode=mode)
        loss, metrics = compute_policy_loss(log_prob, log_prob.detach(), adv, mask, norm, options)
        loss.backward()
        assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
        assert metrics["pg_clipfrac"].item() == 0.0 and metrics["ppo_kl"].item() == 0.0
        torch.testing.assert_close(log_prob.grad, -adv * weight, rtol=0, atol=1e-7)
        assert log_prob.grad.abs().sum() > 0


def test_gspo_uses_the_sequence_ratio():
    # row 0: log-ratios 0.1, 0.3 -> s = e^0.2 = 1.2214 > 1.2, A = 1: clipped, loss -1.2, no gradient
    # row 1: log-ratios -0.1, 0, 0.05 -> s = e^(-0.05/3) = 0.98347, A = -1: inside the clip,
    #        loss s per token, gradient -A * s per token
    log_prob = torch.tensor([[0.1, 0.3, 0.0], [-0.1, 0.0, 0.05]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])
    options = PolicyLossOptions(policy_loss="gspo", clip_ratio=0.2, loss_agg_mode="seq-mean-token-mean")
    loss, metrics = compute_policy_loss(log_prob, torch.zeros(2, 3), adv, mask, compute_loss_normalisers(mask), options)
    loss.backward()
    s1 = math.exp(-0.05 / 3)
    assert loss.item() == pytest.approx((-1.2 + s1) / 2, abs=1e-6)
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 5)
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0, 0, 0], [s1 / 6, s1 / 6, s1 / 6]]), rtol=0, atol=1e-7)


def test_entropy_bonus_and_kl_loss_terms():
    log_prob = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -1.0, -1.0]])
    entropy = torch.tensor([[1.0, 2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.float32)
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    options = PolicyLossOptions(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k2", entropy_coeff=0.1)
    loss, metrics = compute_policy_loss(
        log_prob, log_prob.detach(), adv, mask, compute_loss_normalisers(mask), options, ref_log_prob=ref, entropy=entropy
    )
    loss.backward()
    # pg: -(1 - 1)/2 = 0; entropy: (1 + 2)/2 = 1.5; k2: (0.5 * 0.25 + 0)/2 = 0.0625
    assert metrics["pg_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["entropy"].item() == pytest.approx(1.5)
    assert metrics["kl_loss"].item() == pytest.approx(0.0625)
    assert loss.item() == pytest.approx(0.0 - 0.1 * 1.5 + 0.5 * 0.0625)
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.05, -0.05, 0.0]]))
    # d/dlp: pg -A/2 -> -0.5, +0.5; kl 0.5 * (lp - ref) / 2 -> 0.5*0.5/2 = 0.125, 0
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-0.5 + 0.125, 0.5, 0.0]]))


def test_entropy_metric_without_bonus_has_no_gradient_path():
    entropy = torch.tensor([[1.0, 3.0]], requires_grad=True)
    lp = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2)
    loss, metrics = compute_policy_loss(lp, lp.detach(), torch.ones(1, 2), mask, compute_loss_normalisers(mask),
                                        PolicyLossOptions(), entropy=entropy)
    loss.backward()
    assert metrics["entropy"].item() == 2.0 and entropy.grad is None


def test_missing_inputs_are_clear_errors():
    lp = torch.zeros(1, 2, requires_grad=True)
    mask, norm = torch.ones(1, 2), LossNormalisers(2, 1)
    with pytest.raises(ValueError, match="no ref_log_prob"):
        compute_policy_loss(lp, lp, lp, mask, norm, PolicyLossOptions(use_kl_loss=True))
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        compute_policy_loss(lp, lp, lp, mask, norm, PolicyLossOptions(entropy_coeff=0.01))
    with pytest.raises(ValueError, match="same shape|one shape"):
        compute_policy_loss(lp, lp, torch.zeros(2, 2), mask, norm, PolicyLossOptions())
