"""Clip-Cov and KL-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models", arXiv:2505.22617): entropy collapse is driven by a few tokens whose advantage and
log-probability covary strongly; these losses restrain just those tokens.

Per loss token t of the mini-batch (N tokens):  cov_t = (A_t - mean A) * (log pi_t - mean log pi),
the means over the mini-batch's loss tokens.

Why the selection happens per mini-batch. verl selects within each micro-batch, so which tokens are
restrained (and how many: a fraction of the micro-batch's tokens) depends on the micro-batch and DP
split. Here `select_covariance_tokens` runs ONCE per mini-batch on all its rows, before
micro-batching, from the log-probs of the policy that sampled it (old_log_prob), and the selection
travels with the mini-batch as a per-token field (`cov_selected`). On the first (on-policy) update
old_log_prob equals the current log-probs, so the selection is the paper's; on later updates of the
same data it stays fixed. Clip-Cov's random pick uses a generator seeded with a constant, so every
rank draws the same tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megarl.algorithms.policy_losses import (
    LossNeeds,
    PolicyLossTerms,
    clamped_log_ratio,
    declare_loss_needs,
    no_clip,
    register_policy_loss,
)

if TYPE_CHECKING:
    from megarl.algorithms.loss import PolicyLossOptions

SELECTED_FIELD = "cov_selected"
CLIP_COV_SEED = 0


def token_covariance(old_log_prob: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """cov_t over the loss tokens `[batch, seq]` float64 (0 outside the mask)."""
    mask = loss_mask.bool()
    adv, lp = advantages.to(torch.float64), old_log_prob.to(torch.float64)
    n = mask.sum().clamp(min=1)
    adv_mean = torch.where(mask, adv, 0).sum() / n
    lp_mean = torch.where(mask, lp, 0).sum() / n
    return torch.where(mask, (adv - adv_mean) * (lp - lp_mean), 0)


def select_covariance_tokens(old_log_prob, advantages, loss_mask, options: "PolicyLossOptions") -> dict[str, torch.Tensor]:
    """`{"cov_selected": [batch, seq] float 0/1}` for the mini-batch.

    clip_cov: max(int(clip_cov_ratio * N), 1) tokens drawn uniformly (seeded) among the loss tokens
    with clip_cov_lb < cov_t < clip_cov_ub (fewer if fewer qualify).
    kl_cov: the max(int(kl_cov_ratio * N), 1) loss tokens of largest cov_t (none if N = 0).
    """
    mask = loss_mask.bool()
    cov = token_covariance(old_log_prob, advantages, loss_mask)
    n_tokens = int(mask.sum())
    selected = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    flat = selected.view(-1)
    if n_tokens == 0:
        return {SELECTED_FIELD: selected.to(old_log_prob.dtype)}
    if options.policy_loss == "clip_cov":
        k = max(int(options.clip_cov_ratio * n_tokens), 1)
        candidates = (mask & (cov > options.clip_cov_lb) & (cov < options.clip_cov_ub)).view(-1).nonzero().squeeze(-1)
        generator = torch.Generator().manual_seed(CLIP_COV_SEED)
        pick = torch.randperm(len(candidates), generator=generator)[:k]
        flat[candidates[pick.to(candidates.device)]] = True
    else:
        k = max(int(options.kl_cov_ratio * n_tokens), 1)
        valid = mask.view(-1).nonzero().squeeze(-1)
        top = torch.topk(cov.view(-1)[valid], min(k, len(valid))).indices
        flat[valid[top]] = True
    return {SELECTED_FIELD: selected.to(old_log_prob.dtype)}


_COV_NEEDS = LossNeeds(prepare=select_covariance_tokens, mini_batch_fields=(SELECTED_FIELD,))


@register_policy_loss("clip_cov")
def clip_cov(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", *, cov_selected,
             **_) -> PolicyLossTerms:
    """Clip-Cov: the PPO clipped surrogate (no dual clip), with the gradient of the selected
    high-covariance tokens removed: L_t = max(-A r, -A clip(r, 1 - low, 1 + high)) * (1 - s_t),
    s_t = cov_selected (see `select_covariance_tokens`), except where PPO's own clip is already
    active (verl excludes those tokens from the candidates). clipped: the token is restrained by the
    covariance clip (verl's pg_clipfrac for clip_cov); clipped_lower: PPO's ratio clip is active.
    """
    log_ratio = clamped_log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1.0 - options.clip_low, 1.0 + options.clip_high)
    by_ratio = clipped_term > unclipped
    restrained = (cov_selected > 0) & ~by_ratio
    loss = torch.maximum(unclipped, clipped_term) * (~restrained).to(log_prob.dtype)
    return PolicyLossTerms(loss, restrained, by_ratio, log_ratio.detach())


@register_policy_loss("kl_cov")
def kl_cov(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", *, cov_selected,
           **_) -> PolicyLossTerms:
    """KL-Cov: the unclipped surrogate -A r, plus a KL penalty on the selected high-covariance tokens:
    L_t = -A_t r_t + ppo_kl_coef * |log r_t| * s_t,  s_t = cov_selected. No ratio clipping.
    clipped: the token carries the penalty.
    """
    log_ratio = clamped_log_ratio(log_prob, old_log_prob)
    selected = cov_selected > 0
    loss = -advantages * log_ratio.exp() + options.ppo_kl_coef * log_ratio.abs() * selected.to(log_prob.dtype)
    return PolicyLossTerms(loss, selected, no_clip(loss), log_ratio.detach())


declare_loss_needs(clip_cov, _COV_NEEDS)
declare_loss_needs(kl_cov, _COV_NEEDS)
