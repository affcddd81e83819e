"""Per-token policy-gradient losses. Aggregation, KL and entropy terms are added by `loss.py`.

A registered policy loss maps `[batch, seq]` tensors to `PolicyLossTerms`: the per-token loss (to be
minimised, before aggregation) and per-token indicators for the metrics users watch. Register your
own with `@register_policy_loss("name")`; it receives (log_prob, old_log_prob, advantages,
loss_mask, options) with options a `PolicyLossOptions`. A loss that needs more declares it with
`declare_loss_needs(fn, LossNeeds(...))` and receives those inputs as keyword arguments:
  rollout_log_prob   the rollout engine's log-probs (bypass mode); the loss then applies any IS
                     weighting itself and compute_policy_loss does not add the TIS weight again;
  mini-batch inputs  per-token tensors computed ONCE per mini-batch by `prepare_policy_loss_inputs`
                     (before micro-batching, like the loss normalisers), so a selection over the
                     whole mini-batch (Clip-Cov, KL-Cov) does not depend on the micro-batch split.

Where the losses are: ppo/vanilla and gspo here; cispo, sapo, geo_mean (GMPO), dppo_tv, dppo_kl in
trust_region_losses.py; clip_cov, kl_cov in covariance_losses.py; reinforce/gpg, dro, bypass_mode in
reinforce_losses.py.

Stability clamp: log(pi/pi_old) is clamped to [-20, 20] before exp (as verl). A ratio beyond e^20
means the batch is far off-policy; the clamp keeps exp finite (no inf * 0 = NaN in masked tokens),
and the gradient of a clamped token is zero (PPO clipping zeroes it anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

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

# (old_log_prob, advantages, loss_mask, options) -> {field name: `[batch, seq]` float tensor}
MiniBatchPrepareFn = Callable[..., dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LossNeeds:
    """What a policy loss needs beyond (log_prob, old_log_prob, advantages, loss_mask, options).

    rollout_log_prob: the loss takes `rollout_log_prob=` and handles the rollout/train IS weight itself.
    prepare / mini_batch_fields: `prepare(old_log_prob, advantages, loss_mask, options)` runs on the
    whole mini-batch and returns these per-token fields, passed to the loss as keyword arguments.
    """

    rollout_log_prob: bool = False
    prepare: Optional[MiniBatchPrepareFn] = None
    mini_batch_fields: tuple[str, ...] = ()


_NEEDS: dict[int, LossNeeds] = {}


def declare_loss_needs(fn: PolicyLossFn, needs: LossNeeds) -> PolicyLossFn:
    _NEEDS[id(fn)] = needs
    return fn


def policy_loss_needs(name: str) -> LossNeeds:
    return _NEEDS.get(id(POLICY_LOSSES.get(name)), LossNeeds())


def prepare_policy_loss_inputs(options: "PolicyLossOptions", old_log_prob: torch.Tensor, advantages: torch.Tensor,
                               loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mini-batch-level inputs of `options.policy_loss` (empty for most losses). Call once per
    mini-batch on ALL its rows (every DP rank holds the whole mini-batch), after any rollout
    rejection, and attach the result as fields of the mini-batch."""
    needs = policy_loss_needs(options.policy_loss)
    if needs.prepare is None:
        return {}
    return needs.prepare(old_log_prob.detach(), advantages.detach(), loss_mask, options)


def clamped_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """log(pi/pi_old) clamped to [-20, 20] (differentiable inside the clamp)."""
    return (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def no_clip(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, dtype=torch.bool)


@register_policy_loss("ppo", aliases=("vanilla",))
def ppo_clip(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
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
def gspo(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
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
