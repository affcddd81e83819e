"""Optimal token baseline (OTB, verl 0.9.1's optimal_token_baseline / tir_optimal_token_baseline):
a per-position baseline within each prompt group that minimises the policy-gradient variance.

For a group of N responses to one prompt, with G_t the reward-to-go of the token at position t and
the per-token variance proxy of the score function ||grad log pi_t||^2 ~ w_t = 1 - 2 pi_t + sum_v pi_v^2
(pi_t: the sampled token's probability; sum_v pi_v^2 over the vocabulary, both under the sampling
policy), the cumulative path variance is W_t = sum_{j <= t} w_j and

    B_t = sum_i G_{i,t} W_{i,t} / (sum_i W_{i,t} + eps),   A_{i,t} = G_{i,t} - B_t.

Positions: optimal_token_baseline aligns the group's rows by position in the tensor (a group shares
its prompt, so this is the k-th response token of single-turn rollouts); tir_optimal_token_baseline
aligns by the index of the LOSS token (the k-th trained token, skipping tool outputs in multi-turn
rollouts). zero_tail (default: off / on, as verl's handle_zero_tail): where the single longest
response of a group extends past the second longest, its baseline there is 0 (no other response
estimates it). A singleton group has baseline 0 (advantage = reward-to-go).

Inputs beyond the usual: old_log_prob `[batch, seq]` (nats) and sum_pi_squared `[batch, seq]`; the
trainer computes the latter with one more actor forward (`MegatronTrainWorker.compute_sum_pi_squared`).
Difference from verl: with rollout IS on, verl scales w_t by the squared IS weight; here the
baseline does not (tis.is_cap still weights the loss).
"""

from __future__ import annotations

import torch

from megarl.algorithms.advantages import _require, discounted_returns, group_index, register_advantage

OTB_EPSILON = 1e-8


def _compact(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Left-align each row's mask tokens: `[batch, max loss tokens]`, zero-padded."""
    lengths = mask.sum(-1)
    out = values.new_zeros(values.shape[0], int(lengths.max()) if values.numel() else 0)
    for row in range(values.shape[0]):
        out[row, : int(lengths[row])] = values[row, mask[row]]
    return out


def optimal_token_baseline_advantages(token_level_rewards, response_mask, uids, old_log_prob, sum_pi_squared, *,
                                      by_loss_token: bool, zero_tail: bool):
    """(advantages, returns) `[batch, seq]`; see the module docstring."""
    mask = response_mask.bool()
    returns = discounted_returns(token_level_rewards, response_mask, 1.0)
    w = (1.0 - 2.0 * old_log_prob.to(torch.float64).exp() + sum_pi_squared.to(torch.float64)) * mask
    cumulative = w.cumsum(-1) * mask
    if by_loss_token:
        returns_a, cumulative_a, mask_a = _compact(returns, mask), _compact(cumulative, mask), _compact(mask, mask)
    else:
        returns_a, cumulative_a, mask_a = returns, cumulative, mask
    index, num_groups = group_index(uids)
    baseline = torch.zeros_like(returns_a)
    lengths = mask_a.sum(-1)
    for group in range(num_groups):
        members = (index == group).nonzero().flatten()
        if len(members) < 2:
            continue
        m = mask_a[members].to(torch.float64)
        b = (returns_a[members] * cumulative_a[members] * m).sum(0) / ((cumulative_a[members] * m).sum(0) + OTB_EPSILON)
        baseline[members] = b
        if zero_tail:
            ordered = lengths[members].sort(descending=True).values
            if ordered[0] > ordered[1]:
                longest = members[lengths[members] == ordered[0]][0]
                # the positions past the second-longest response (by position or by loss-token index)
                past = (mask_a[longest].cumsum(-1) > int(ordered[1])) if not by_loss_token else \
                    torch.arange(mask_a.shape[1]) >= int(ordered[1])
                baseline[longest, past] = 0.0
    adv_a = (returns_a - baseline) * mask_a
    if by_loss_token:
        adv = torch.zeros_like(returns)
        for row in range(adv.shape[0]):
            adv[row, mask[row]] = adv_a[row, : int(lengths[row])]
    else:
        adv = adv_a
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


def _check(uids, old_log_prob, sum_pi_squared, name):
    _require(uids, "uids (prompt ids)", name)
    _require(old_log_prob, "old_log_prob (the sampling policy's log-probs)", name)
    _require(sum_pi_squared, "sum_pi_squared (sum over the vocabulary of pi^2 per token)", name)


@register_advantage("optimal_token_baseline")
def optimal_token_baseline(*, token_level_rewards, response_mask, uids, old_log_prob, sum_pi_squared, **_):
    """OTB by tensor position, no zero tail (see the module docstring)."""
    _check(uids, old_log_prob, sum_pi_squared, "optimal_token_baseline")
    return optimal_token_baseline_advantages(token_level_rewards, response_mask, uids, old_log_prob, sum_pi_squared,
                                             by_loss_token=False, zero_tail=False)


@register_advantage("tir_optimal_token_baseline")
def tir_optimal_token_baseline(*, token_level_rewards, response_mask, uids, old_log_prob, sum_pi_squared, **_):
    """OTB by loss-token index (multi-turn / tool-integrated rollouts), with the zero tail."""
    _check(uids, old_log_prob, sum_pi_squared, "tir_optimal_token_baseline")
    return optimal_token_baseline_advantages(token_level_rewards, response_mask, uids, old_log_prob, sum_pi_squared,
                                             by_loss_token=True, zero_tail=True)
