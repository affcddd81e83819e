"""Per-token policy-gradient losses. Aggregation, KL and entropy terms are added by `loss.py`.

A registered policy loss maps `[batch, seq]` tensors to `PolicyLossTerms`: the per-token loss (to be
minimised, before aggregation) and per-token indicators for the metrics users watch. Register your
own with `@register_policy_loss("name")`; it receives (log_prob, old_log_prob, advantages,
loss_mask, options) with options a `PolicyLossOptions`.

Stability clamp: log(pi/pi_old) is clamped to [-20, 20] before exp (as verl). A ratio beyond e^20
means the batch is far off-policy; the clamp keeps exp finite (no inf * 0 = NaN in masked tokens),
and the gradient of a clamped token is zero (PPO clipping zeroes it anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from megarl.utils.registry import Registry

if TYPE_CHECKING:
    from megarl.algorithms.loss import PolicyLossOptions

LOG_RATIO_CLAMP = 20.0
GSPO_LOG_RATIO_MAX = 10.0


@dataclass
class PolicyLossTerms:
    """per_token_loss: `[batch, seq]` differentiable. clipped / clipped_lower: `[batch, seq]` bool,
    where the (upper-or-lower) PPO clip / the dual clip is the active term. log_ratio: `[batch, seq]`
    detached log(pi/pi_old) in nats (the approximate KL metric is its negated token mean)."""

    per_token_loss: torch.Tensor
    clipped: torch.Tensor
    clipped_lower: torch.Tensor
    log_ratio: torch.Tensor


PolicyLossFn = Callable[..., PolicyLossTerms]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register


@register_policy_loss("ppo", aliases=("vanilla",))
def ppo_clip(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions") -> PolicyLossTerms:
    """PPO clipped surrogate with asymmetric clip and optional dual clip.

    ratio r = pi/pi_old;  L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)).
    Dual clip (Ye et al., 2020), for A < 0 only: L = min(L, -A * clip_ratio_c), so a token whose
    ratio exploded cannot push an unbounded loss; its gradient is then zero.
    clipped: the clip term is strictly larger (gradient cut); clipped_lower: the dual clip is active.
    """
    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    low, high = options.clip_low, options.clip_high
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    negative = advantages < 0
    if options.clip_ratio_c is not None:
        dual_bound = -advantages * options.clip_ratio_c
        clipped_lower = (loss > dual_bound) & negative
        loss = torch.where(negative, torch.minimum(loss, dual_bound), loss)
    else:
        clipped_lower = torch.zeros_like(clipped)
    return PolicyLossTerms(loss, clipped, clipped_lower, log_ratio.detach())


@register_policy_loss("gspo")
def gspo(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions") -> PolicyLossTerms:
    """GSPO (Zheng et al., 2025): PPO clipping on the sequence-level ratio
    s_i = exp(mean over the sequence's loss tokens of log(pi/pi_old)).

    Per token the ratio is s_i * pi_t / sg(pi_t): its value is s_i, its gradient flows through each
    token's log-prob scaled by s_i (the paper's GSPO-token form; equal to GSPO for sequence-level
    advantages). log s_i is capped at 10 as verl does. The paper aggregates with
    seq-mean-token-mean; set loss_agg_mode accordingly. No dual clip.
    """
    mask = loss_mask.to(log_prob.dtype)
    token_log_ratio = (log_prob - old_log_prob) * mask
    seq_log_ratio = token_log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)
    log_ratio = (log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(max=GSPO_LOG_RATIO_MAX)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1.0 - options.clip_low, 1.0 + options.clip_high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    return PolicyLossTerms(loss, clipped, torch.zeros_like(clipped), token_log_ratio.detach())
