"""Critic value loss with clipping, SFT cross-entropy and DPO (sigmoid, IPO), by hand."""

import math

import pytest
import torch

from megarl.algorithms import DPOOptions, compute_dpo_loss, compute_loss_normalisers, compute_sft_loss, compute_value_loss


def test_value_loss_with_clipping():
    values = torch.tensor([[1.0, 2.0, 0.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float32)
    # token 0: clip(1, 0.3, 0.7) = 0.7 -> (0.7-2)^2 = 1.69 > (1-2)^2 = 1: clipped, no gradient
    # token 1: inside -> 1, gradient 0.5 * 2 * (2-1) / 3
    # token 2: clip(0, 0.8, 1.2) = 0.8 -> 0.64 > 0: clipped, no gradient
    loss, m = compute_value_loss(values, old, returns, mask, compute_loss_normalisers(mask), cliprange_value=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.64) / 3)
    assert m["vf_clipfrac"].item() == pytest.approx(2 / 3)
    assert m["vpred_mean"].item() == pytest.approx(1.0)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1 / 3, 0.0, 0.0]]))
    unclipped, _ = compute_value_loss(values, old, returns, mask, compute_loss_normalisers(mask), cliprange_value=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.0) / 3)


def test_sft_cross_entropy_token_mean():
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    loss, m = compute_sft_loss(lp, mask, compute_loss_normalisers(mask))
    loss.backward()
    assert loss.item() == pytest.approx(3.5 / 3)
    assert m["nll_token_mean"].item() == pytest.approx(3.5 / 3)
    torch.testing.assert_close(lp.grad, -mask / 3)
    seq, _ = compute_sft_loss(lp, mask, compute_loss_normalisers(mask), loss_agg_mode="seq-mean-token-mean")
    assert seq.item() == pytest.approx((1.5 + 0.5) / 2)


# One pair: chosen tokens -1, -2 (sum -3, mean -1.5); rejected -2, -2 (sum -4, mean -2);
# reference chosen -1.5, -2 (sum -3.5, mean -1.75); reference rejected -1.5, -1.5 (sum -3, mean -1.5).
CHOSEN = torch.tensor([[0.0, -1.0, -2.0]])
REJECTED = torch.tensor([[0.0, -2.0, -2.0]])
REF_CHOSEN = torch.tensor([[0.0, -1.5, -2.0]])
REF_REJECTED = torch.tensor([[0.0, -1.5, -1.5]])
MASK = torch.tensor([[0, 1, 1]], dtype=torch.float32)


def _dpo(options):
    chosen, rejected = CHOSEN.clone().requires_grad_(True), REJECTED.clone().requires_grad_(True)
    loss, m = compute_dpo_loss(chosen, MASK, rejected, MASK, REF_CHOSEN, REF_REJECTED, options)
    loss.backward()
    return loss, m, chosen.grad, rejected.grad


def test_dpo_sigmoid():
    # h = (-3 + 4) - (-3.5 + 3) = 1.5; loss = -log sigmoid(0.1 * 1.5) = log(1 + e^-0.15)
    loss, m, g_chosen, g_rejected = _dpo(DPOOptions(beta=0.1))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.05)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.15)
    assert m["rewards/accuracies"].item() == 1.0
    g = -0.1 / (1 + math.exp(0.15))  # dL/dh = -beta * sigmoid(-beta h)
    torch.testing.assert_close(g_chosen, torch.tensor([[0.0, g, g]]))
    torch.testing.assert_close(g_rejected, torch.tensor([[0.0, -g, -g]]))


def test_dpo_label_smoothing_and_ipo():
    smooth, *_ = _dpo(DPOOptions(beta=0.1, label_smoothing=0.1))
    expected = -0.9 * math.log(1 / (1 + math.exp(-0.15))) - 0.1 * math.log(1 / (1 + math.exp(0.15)))
    assert smooth.item() == pytest.approx(expected, abs=1e-6)
    # IPO on mean log-probs: h = (-1.5 + 2) - (-1.75 + 1.5) = 0.75; (0.75 - 1/(2*0.1))^2 = 4.25^2
    ipo, _, g_chosen, _ = _dpo(DPOOptions(beta=0.1, loss_type="ipo"))
    assert ipo.item() == pytest.approx(4.25 ** 2, abs=1e-5)
    torch.testing.assert_close(g_chosen, torch.tensor([[0.0, -4.25, -4.25]]))  # 2 * (-4.25) / 2 tokens


def test_dpo_global_pair_count_and_unknown_type():
    chosen = CHOSEN.clone().requires_grad_(True)
    loss, _ = compute_dpo_loss(chosen, MASK, REJECTED, MASK, REF_CHOSEN, REF_REJECTED, DPOOptions(), num_pairs=4)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="registered: ipo, sigmoid"):
        DPOOptions(loss_type="hinge")
