"""Policy-gradient losses without PPO's ratio surrogate: REINFORCE (= GPG's loss), DRO, and the
"bypass" mode that uses the rollout engine's log-probs as the old policy.

All tensors are `[batch, seq]` aligned with input_ids, log-probs in nats, A the advantage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megarl.algorithms.policy_losses import (
    LossNeeds,
    PolicyLossTerms,
    declare_loss_needs,
    no_clip,
    ppo_clip,
    register_policy_loss,
)
from megarl.algorithms.rollout_correction import rollout_log_ratio

if TYPE_CHECKING:
    from megarl.algorithms.loss import PolicyLossOptions

BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")


@register_policy_loss("reinforce", aliases=("gpg",))
def reinforce(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
    """Plain REINFORCE (Williams, 1992), also GPG's loss (Chu et al., arXiv:2504.02546):
    L_t = -A_t * log pi_t, gradient -A grad log pi; no ratio, no clip (on-policy by construction:
    old_log_prob only feeds the ppo_kl metric). With tis.is_cap the TIS weight multiplies it.
    """
    loss = -advantages * log_prob
    return PolicyLossTerms(loss, no_clip(loss), no_clip(loss), (log_prob - old_log_prob).detach())


@register_policy_loss("dro")
def dro(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
    """DRO, the REINFORCE objective with a quadratic proximity penalty instead of a clip
    (the "dro" loss of SkyRL / Tinker; cf. Richemond et al., arXiv:2405.19107):
    L_t = -(A_t log pi_t - dro_beta / 2 * (log pi_t - log pi_old_t)^2).
    Gradient: -(A_t - dro_beta * log r_t) grad log pi_t: the push fades as the token moves away.
    """
    log_ratio = log_prob - old_log_prob
    loss = -(advantages * log_prob - 0.5 * options.dro_beta * log_ratio.square())
    return PolicyLossTerms(loss, no_clip(loss), no_clip(loss), log_ratio.detach())


@register_policy_loss("bypass_mode", aliases=("bypass",))
def bypass_mode(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", *, rollout_log_prob,
                **_) -> PolicyLossTerms:
    """Bypass mode (verl's rollout_correction.bypass_mode): the rollout engine's log-probs ARE the
    old policy, pi_old := pi_rollout, so the recomputed old_log_prob is not used by the loss.

    bypass_loss_type "ppo_clip": PPO (clip-higher, dual clip) with r = pi / pi_rollout; the ratio
      already corrects for the mismatch, so no IS weight is applied (tis.is_cap is refused).
    bypass_loss_type "reinforce": L_t = -sg(w_t) * A_t * log pi_t with the IS weight
      w = pi / pi_rollout at tis.level (token / sequence / geometric), truncated at tis.is_cap
      (None = untruncated). clipped: the weight hit the cap.
    """
    rollout_log_prob = rollout_log_prob.detach()
    if options.bypass_loss_type == "ppo_clip":
        return ppo_clip(log_prob, rollout_log_prob, advantages, loss_mask, options)
    correction = options.rollout_correction
    weight = rollout_log_ratio(log_prob.detach(), rollout_log_prob, loss_mask, correction.level).exp()
    capped = no_clip(weight)
    if correction.is_cap is not None:
        capped = weight > correction.is_cap
        weight = weight.clamp(max=correction.is_cap)
    loss = -weight * advantages * log_prob
    return PolicyLossTerms(loss, capped, no_clip(loss), (log_prob - rollout_log_prob).detach())


declare_loss_needs(bypass_mode, LossNeeds(rollout_log_prob=True))
