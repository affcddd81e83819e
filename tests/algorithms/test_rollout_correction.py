"""Truncated IS, rejection masking and mismatch metrics between trainer and rollout log-probs."""

import math

import pytest
import torch

from megarl.algorithms import (
    PolicyLossOptions,
    RolloutCorrectionOptions,
    apply_rollout_rejection,
    compute_loss_normalisers,
    compute_policy_loss,
    truncated_is_weights,
)

# rho = pi_old / pi_rollout per loss token: row 0: 3, 0.5, 1; row 1: 1.5, 1.2 (position 3 is padding)
RHO = [[3.0, 0.5, 1.0, 1.0], [1.5, 1.2, 1.0, 1.0]]
OLD = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]])
ROLLOUT = OLD - torch.tensor(RHO).log()
ROLLOUT[0, 3] = -50.0  # a wild value under the mask must not count
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)


@pytest.mark.parametrize(
    "level, cap, weights, capped",
    [
        ("token", 2.0, [[2.0, 0.5, 1.0], [1.5, 1.2]], [[1, 0, 0], [0, 0]]),
        ("sequence", 2.0, [[1.5] * 3, [1.8] * 2], [[0, 0, 0], [0, 0]]),  # products 1.5 and 1.8
        ("sequence", 1.6, [[1.5] * 3, [1.6] * 2], [[0, 0, 0], [1, 1]]),
        ("geometric", 5.0, [[1.5 ** (1 / 3)] * 3, [1.8 ** 0.5] * 2], [[0, 0, 0], [0, 0]]),
    ],
)
def test_truncated_is_weights(level, cap, weights, capped):
    w, c = truncated_is_weights(OLD, ROLLOUT, MASK, RolloutCorrectionOptions(level=level, is_cap=cap))
    torch.testing.assert_close(w[0, :3], torch.tensor(weights[0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w[1, :2], torch.tensor(weights[1]), rtol=1e-6, atol=1e-6)
    assert c[0, :3].tolist() == [bool(x) for x in capped[0]] and c[1, :2].tolist() == [bool(x) for x in capped[1]]


def test_tis_weights_the_policy_loss_and_reports_mismatch_metrics():
    log_prob = OLD.clone().requires_grad_(True)  # on-policy w.r.t. old
    options = PolicyLossOptions(rollout_correction=RolloutCorrectionOptions(is_cap=2.0))
    norm = compute_loss_normalisers(MASK)
    loss, m = compute_policy_loss(log_prob, OLD, torch.ones(2, 4), MASK, norm, options, rollout_log_prob=ROLLOUT)
    loss.backward()
    w = [2.0, 0.5, 1.0, 1.5, 1.2]
    assert loss.item() == pytest.approx(-sum(w) / 5, abs=1e-6)
    torch.testing.assert_close(log_prob.grad, -torch.tensor([[2.0, 0.5, 1.0, 0], [1.5, 1.2, 0, 0]]) / 5)
    logs = [math.log(3), math.log(0.5), 0.0, math.log(1.5), math.log(1.2)]
    assert m["mismatch/log_prob_abs_diff"].item() == pytest.approx(sum(abs(x) for x in logs) / 5, abs=1e-6)
    # k3 estimate of KL(rollout || old) with r = rho: r - 1 - log r
    k3 = [math.exp(x) - 1 - x for x in logs]
    assert m["mismatch/k3_kl"].item() == pytest.approx(sum(k3) / 5, abs=1e-6)
    assert m["mismatch/is_capped_fraction"].item() == pytest.approx(1 / 5)
    assert m["mismatch/is_weight_mean"].item() == pytest.approx(sum(w) / 5, abs=1e-6)


def test_token_rejection_masks_tokens_past_the_bounds():
    options = RolloutCorrectionOptions(reject_above=2.0, reject_below=0.6)
    new_mask, m = apply_rollout_rejection(OLD, ROLLOUT, MASK, options)
    assert new_mask.tolist() == [[0, 0, 1, 0], [1, 1, 0, 0]]
    assert m["mismatch/rejected_token_fraction"].item() == pytest.approx(2 / 5)
    assert m["mismatch/rejected_seq_fraction"].item() == pytest.approx(1 / 2)


def test_sequence_rejection_masks_whole_sequences():
    options = RolloutCorrectionOptions(level="sequence", reject_above=1.7)
    new_mask, m = apply_rollout_rejection(OLD, ROLLOUT, MASK.bool(), options)
    assert new_mask.tolist() == [[True, True, True, False], [False, False, False, False]]
    assert m["mismatch/rejected_token_fraction"].item() == pytest.approx(2 / 5)


def test_policy_loss_refuses_a_mask_that_was_not_rejected_first():
    options = PolicyLossOptions(rollout_correction=RolloutCorrectionOptions(reject_above=2.0))
    lp = OLD.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="apply_rollout_rejection"):
        compute_policy_loss(lp, OLD, torch.ones(2, 4), MASK, compute_loss_normalisers(MASK), options,
                            rollout_log_prob=ROLLOUT)
    new_mask, _ = apply_rollout_rejection(OLD, ROLLOUT, MASK, options.rollout_correction)
    loss, _ = compute_policy_loss(lp, OLD, torch.ones(2, 4), new_mask, compute_loss_normalisers(new_mask), options,
                                  rollout_log_prob=ROLLOUT)
    assert loss.item() == pytest.approx(-1.0)  # on-policy, A = 1, token-mean over the 4 kept tokens


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="registered: token, sequence, geometric"):
        RolloutCorrectionOptions(level="tok")
    with pytest.raises(ValueError, match="reject_above must be > 1"):
        RolloutCorrectionOptions(reject_above=0.9)
    with pytest.raises(ValueError, match="no rollout_log_prob"):
        lp = torch.zeros(1, 2)
        compute_policy_loss(lp, lp, lp, torch.ones(1, 2), compute_loss_normalisers(torch.ones(1, 2)),
                            PolicyLossOptions(rollout_correction=RolloutCorrectionOptions(is_cap=2.0)))
