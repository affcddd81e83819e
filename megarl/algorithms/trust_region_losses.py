"""Policy losses that bound the update differently from PPO's ratio clip: CISPO, SAPO, GMPO and DPPO.

All tensors are `[batch, seq]` aligned with input_ids, log-probs in nats; r = pi/pi_old per token
with log r clamped to [-20, 20]; A the advantage. Each returns the per-token loss (to minimise)
before aggregation, which `loss.py` does with `loss_agg_mode` over the global batch. Names are the
ones verl 0.9.1 users type (`policy_loss: cispo`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megarl.algorithms.policy_losses import PolicyLossTerms, clamped_log_ratio, no_clip, register_policy_loss

if TYPE_CHECKING:
    from megarl.algorithms.loss import PolicyLossOptions

BINARY_KL_EPS = 1e-8


@register_policy_loss("cispo")
def cispo(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
    """CISPO (MiniMax-M1, arXiv:2506.13585): clip the importance weight, not the update.

    L_t = -sg(clip(r_t, 1 - clip_ratio_low, 1 + clip_ratio_high)) * A_t * log pi_t.
    Every token keeps a gradient (-w A grad log pi); a clipped weight only scales it.
    clipped: r_t lies outside the clip range.
    """
    log_ratio = clamped_log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.detach().exp()
    weight = ratio.clamp(1.0 - options.clip_low, 1.0 + options.clip_high)
    loss = -weight * advantages * log_prob
    return PolicyLossTerms(loss, weight != ratio, no_clip(loss), log_ratio.detach())


@register_policy_loss("sapo")
def sapo(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
    """SAPO (Qwen, arXiv:2511.20347): a smooth, temperature-controlled gate in place of the hard clip.

    f_tau(r) = sigmoid(tau (r - 1)) * 4 / tau,  tau = tau_pos if A_t > 0 else tau_neg;
    L_t = -f_tau(r_t) * A_t. At r = 1 the gradient equals PPO's (f'(1) = 1); it decays smoothly as r
    leaves 1 (faster for negative advantages when tau_neg > tau_pos). The paper (and verl) aggregate
    with seq-mean-token-mean; set loss_agg_mode accordingly. No clipped tokens (metrics are 0).
    """
    log_ratio = clamped_log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    tau = torch.where(advantages > 0, options.tau_pos, options.tau_neg).to(ratio.dtype)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = -gate * advantages
    return PolicyLossTerms(loss, no_clip(loss), no_clip(loss), log_ratio.detach())


@register_policy_loss("geo_mean", aliases=("gmpo",))
def geo_mean(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
    """GMPO (arXiv:2507.20673): maximise the GEOMETRIC mean of the token ratios of a sequence.

    Per token the log-ratio is clipped in log space, pessimistically for the sign of A:
      l_t = sgn(A_t) * min(sgn(A_t) * log r_t, sgn(A_t) * clip(log r_t, -clip_ratio_low, clip_ratio_high))
    then per sequence i (its loss tokens T_i):  rho_i = exp(mean_{t in T_i} l_t),
    Abar_i = mean_{t in T_i} A_t (a sequence-level advantage), and L_i = -Abar_i * rho_i.
    The per-token loss is L_i on every loss token of row i, so seq-mean-token-mean gives verl's
    mean over sequences of L_i (verl always uses that; other modes weight sequences differently).
    Note: clip_ratio_low/high bound the LOG-ratio here (the paper uses 0.4, i.e. r in [e^-0.4, e^0.4]).
    With tis.is_cap the TIS weight multiplies each token's share of L_i; tis.level=geometric makes it
    one weight per sequence, as verl's geometric-mean weighting of GMPO.
    clipped / clipped_lower: the clip is active on a token with A > 0 / A < 0.
    """
    mask = loss_mask.to(log_prob.dtype)
    log_ratio = clamped_log_ratio(log_prob, old_log_prob)
    sign = torch.sign(advantages)
    clamped = log_ratio.clamp(-options.clip_low, options.clip_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clamped)
    length = mask.sum(-1).clamp(min=1)
    seq_ratio = torch.exp(torch.where(mask > 0, pessimistic, torch.zeros_like(pessimistic)).sum(-1) / length)
    seq_advantage = (advantages * mask).sum(-1) / length
    loss = (-seq_advantage * seq_ratio).unsqueeze(-1).expand_as(log_prob)
    clipped = log_ratio.detach() != clamped.detach()
    return PolicyLossTerms(loss, clipped & (advantages > 0), clipped & (advantages < 0), log_ratio.detach())


def _dppo(log_prob, old_log_prob, advantages, valid: torch.Tensor, options: "PolicyLossOptions") -> PolicyLossTerms:
    """L_t = -A_t * sg(min(r_t, clip_ratio_c)) * log pi_t * valid_t: the policy gradient of PPO's
    surrogate (its gradient is -A r grad log pi) on the tokens inside the divergence trust region,
    with the IS weight truncated at clip_ratio_c (None = untruncated). clipped: outside the region;
    clipped_lower: inside it but truncated."""
    log_ratio = clamped_log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.detach().exp()
    cap = options.clip_ratio_c
    weight = ratio if cap is None else ratio.clamp(max=cap)
    valid = valid.detach()
    loss = -advantages * weight * log_prob * valid.to(log_prob.dtype)
    truncated = no_clip(loss) if cap is None else (ratio > cap) & valid
    return PolicyLossTerms(loss, ~valid, truncated, log_ratio.detach())


@register_policy_loss("dppo_tv")
def dppo_tv(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
    """DPPO Binary-TV (arXiv:2602.04879): the trust region is on the sampled token's probability
    difference (a total-variation bound), not on the ratio.

    p = pi_t, q = pi_old_t.  valid_t = (p - q <= clip_ratio_high) if A_t > 0 else (p - q >= -clip_ratio_low).
    Here clip_ratio_low/high are TV thresholds (probability units), not ratio margins.
    Loss: see `_dppo` (clip_ratio_c truncates the IS weight; the paper recommends a large value).
    """
    p, q = log_prob.detach().exp(), old_log_prob.exp()
    valid = torch.where(advantages > 0, p - q <= options.clip_high, p - q >= -options.clip_low)
    return _dppo(log_prob, old_log_prob, advantages, valid, options)


def binary_kl(old_log_prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """KL(Bern(q) || Bern(p)) with q = pi_old, p = pi of the sampled token:
    q log(q/p) + (1 - q) log((1 - q) / (1 - p)) (1e-8 keeps the second log finite at p or q = 1)."""
    q, p = old_log_prob.exp(), log_prob.exp()
    return q * (old_log_prob - log_prob) + (1 - q) * torch.log((1 - q + BINARY_KL_EPS) / (1 - p + BINARY_KL_EPS))


@register_policy_loss("dppo_kl")
def dppo_kl(log_prob, old_log_prob, advantages, loss_mask, options: "PolicyLossOptions", **_) -> PolicyLossTerms:
    """DPPO Binary-KL (arXiv:2602.04879): the trust region is a bound on the binary KL of the
    sampled token's probability, applied only in the direction the advantage pushes it.

    valid_t = (KL_b <= clip_ratio_high or p <= q) if A_t > 0 else (KL_b <= clip_ratio_low or p >= q),
    with KL_b = `binary_kl(old, new)` (nats); clip_ratio_low/high are KL thresholds here.
    Loss: see `_dppo`.
    """
    lp = log_prob.detach()
    kl = binary_kl(old_log_prob, lp)
    p, q = lp.exp(), old_log_prob.exp()
    valid = torch.where(advantages > 0, (kl <= options.clip_high) | (p <= q), (kl <= options.clip_low) | (p >= q))
    return _dppo(log_prob, old_log_prob, advantages, valid, options)
