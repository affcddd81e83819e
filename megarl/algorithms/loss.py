"""The per-micro-batch policy (actor) loss the trainer calls, and the critic's value loss.

    normalisers = compute_loss_normalisers(mini_batch_mask, max_response_length=..., dp_group=dp)
    for mb in micro_batches:                       # on every DP rank
        loss, metrics = compute_policy_loss(log_prob, mb.old_log_prob, mb.advantages, mb.loss_mask,
                                            normalisers, options, ref_log_prob=..., entropy=...)
        loss.backward()                            # gradients SUM over micro-batches and DP ranks

loss = pg_loss - entropy_coeff * entropy + kl_loss_coef * kl_loss (KL only with use_kl_loss), each
term aggregated by `options.loss_agg_mode` against the GLOBAL normalisers (see aggregation.py).

Metrics are detached 0-dim tensors and, like the loss, each is this micro-batch's SHARE: summing a
metric over all micro-batches and all DP ranks gives its value on the whole mini-batch (token-mean
metrics are divided by the global token count, aggregated ones by the mode's global denominator).
Names follow verl: pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl, entropy, kl_loss, mismatch/*.

All per-token tensors are `[batch, seq]` aligned with input_ids, log-probs in nats, and only the
positions where loss_mask is 1 count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megarl.algorithms.aggregation import LOSS_AGG_MODES, LossNormalisers, aggregate_loss, token_share
from megarl.algorithms.kl import KL_ESTIMATORS, kl_divergence
from megarl.algorithms.policy_losses import POLICY_LOSSES, policy_loss_needs
from megarl.algorithms.rollout_correction import (
    RolloutCorrectionOptions,
    mismatch_metrics,
    rejection_keep_mask,
    truncated_is_weights,
)


@dataclass
class PolicyLossOptions:
    """policy_loss: a POLICY_LOSSES name (ppo/vanilla, gspo, cispo, sapo, geo_mean/gmpo, clip_cov,
    kl_cov, dppo_tv, dppo_kl, reinforce/gpg, dro, bypass_mode). clip_ratio_low/high default to
    clip_ratio (DAPO clip-higher: e.g. 0.2 / 0.28; for dppo_* they are the divergence thresholds,
    for geo_mean log-ratio bounds). clip_ratio_c: dual-clip bound for negative advantages (> 1; None
    disables; dppo_* truncate their IS weight at it). kl_loss_type: a KL_ESTIMATORS name.
    Loss-specific (verl's names): tau_pos / tau_neg (sapo gate temperatures); clip_cov_ratio,
    clip_cov_lb, clip_cov_ub (clip_cov); kl_cov_ratio, ppo_kl_coef (kl_cov); dro_beta (dro);
    bypass_loss_type "ppo_clip" | "reinforce" (bypass_mode)."""

    policy_loss: str = "ppo"
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None = 3.0
    loss_agg_mode: str = "token-mean"
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    entropy_coeff: float = 0.0
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 1.0
    dro_beta: float = 0.1
    bypass_loss_type: str = "ppo_clip"
    rollout_correction: RolloutCorrectionOptions = field(default_factory=RolloutCorrectionOptions)

    def __post_init__(self):
        from megarl.algorithms.reinforce_losses import BYPASS_LOSS_TYPES

        POLICY_LOSSES.check(self.policy_loss)
        LOSS_AGG_MODES.check(self.loss_agg_mode)
        KL_ESTIMATORS.check(self.kl_loss_type)
        if isinstance(self.rollout_correction, dict):
            self.rollout_correction = RolloutCorrectionOptions(**self.rollout_correction)
        if not 0.0 < self.clip_low < 1.0 or self.clip_high <= 0.0:
            raise ValueError(
                f"clip ratios must satisfy 0 < clip_ratio_low < 1 and clip_ratio_high > 0, "
                f"got low={self.clip_low} high={self.clip_high}"
            )
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {self.clip_ratio_c}; None disables it")
        for name in ("kl_loss_coef", "entropy_coeff"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        for name in ("tau_pos", "tau_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} (SAPO gate temperature) must be > 0, got {getattr(self, name)}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} (fraction of loss tokens) must lie in (0, 1], got {getattr(self, name)}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb} >= {self.clip_cov_ub}")
        if not (self.ppo_kl_coef >= 0 and self.dro_beta >= 0):
            raise ValueError(f"ppo_kl_coef and dro_beta must be >= 0, got {self.ppo_kl_coef}, {self.dro_beta}")
        if self.bypass_loss_type not in BYPASS_LOSS_TYPES:
            raise ValueError(f"unknown bypass_loss_type {self.bypass_loss_type!r}; registered: {', '.join(BYPASS_LOSS_TYPES)}")
        if self.bypasses_old_policy and self.bypass_loss_type == "ppo_clip" and self.rollout_correction.is_cap is not None:
            raise ValueError("bypass_mode with bypass_loss_type=ppo_clip: the PPO ratio pi/pi_rollout already corrects "
                             "for the rollout mismatch, an IS weight (tis.is_cap) would count it twice; unset tis.is_cap "
                             "or use bypass_loss_type=reinforce (which truncates its weight at is_cap)")

    @property
    def bypasses_old_policy(self) -> bool:
        """The loss uses the rollout log-probs as the old policy (and applies its own IS weight)."""
        return policy_loss_needs(self.policy_loss).rollout_log_prob

    @classmethod
    def from_config(cls, algorithm) -> "PolicyLossOptions":
        """From megarl.config's AlgorithmConfig; its `tis` section becomes `rollout_correction`."""
        a = algorithm
        return cls(
            policy_loss=a.policy_loss, clip_ratio=a.clip_ratio, clip_ratio_low=a.clip_ratio_low,
            clip_ratio_high=a.clip_ratio_high, clip_ratio_c=a.clip_ratio_c, loss_agg_mode=a.loss_agg_mode,
            use_kl_loss=a.use_kl_loss, kl_loss_coef=a.kl_loss_coef, kl_loss_type=a.kl_loss_type,
            entropy_coeff=a.entropy_coeff, tau_pos=a.tau_pos, tau_neg=a.tau_neg, clip_cov_ratio=a.clip_cov_ratio,
            clip_cov_lb=a.clip_cov_lb, clip_cov_ub=a.clip_cov_ub, kl_cov_ratio=a.kl_cov_ratio,
            ppo_kl_coef=a.ppo_kl_coef, dro_beta=a.dro_beta, bypass_loss_type=a.bypass_loss_type,
            rollout_correction=RolloutCorrectionOptions.from_config(a.tis),
        )

    @property
    def clip_low(self) -> float:
        return self.clip_ratio if self.clip_ratio_low is None else self.clip_ratio_low

    @property
    def clip_high(self) -> float:
        return self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high


def _check_shapes(**tensors):
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"per-token tensors must all be [batch, seq] of one shape, got {shapes}")


def compute_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    normalisers: LossNormalisers,
    options: PolicyLossOptions,
    *,
    ref_log_prob: torch.Tensor | None = None,
    rollout_log_prob: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    mini_batch_inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's share of the actor loss and metrics.

    log_prob: `[batch, seq]` current policy, differentiable. old_log_prob: the policy that produced
    the advantages' data (trainer recompute; pass log_prob.detach() when on-policy without one).
    advantages: `[batch, seq]`. loss_mask: `[batch, seq]` 0/1 (after any rollout rejection).
    ref_log_prob: needed with use_kl_loss. rollout_log_prob: the rollout engine's log-probs, enables
    TIS weighting (if is_cap) and the mismatch metrics. entropy: `[batch, seq]` per-token entropy
    (nats), differentiable, needed if entropy_coeff != 0. mini_batch_inputs: this micro-batch's rows
    of `prepare_policy_loss_inputs(...)` computed on the whole mini-batch (clip_cov, kl_cov need it).
    A bypass_mode loss needs rollout_log_prob and applies its own IS weight (no TIS weight on top).
    """
    _check_shapes(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, loss_mask=loss_mask,
                  ref_log_prob=ref_log_prob, rollout_log_prob=rollout_log_prob, entropy=entropy)
    correction = options.rollout_correction
    if options.use_kl_loss and ref_log_prob is None:
        raise ValueError("use_kl_loss is set but no ref_log_prob was given")
    if options.entropy_coeff != 0.0 and entropy is None:
        raise ValueError(f"entropy_coeff={options.entropy_coeff} needs the per-token entropy")
    if (correction.is_cap is not None or correction.rejects) and rollout_log_prob is None:
        raise ValueError("rollout correction is configured but no rollout_log_prob was given")

    mask = loss_mask.to(log_prob.dtype)
    mode = options.loss_agg_mode
    old_log_prob, advantages = old_log_prob.detach(), advantages.detach()
    needs = policy_loss_needs(options.policy_loss)
    extra = {}
    if needs.rollout_log_prob:
        if rollout_log_prob is None:
            raise ValueError(f"policy_loss {options.policy_loss!r} uses the rollout log-probs as the old policy; "
                             "pass rollout_log_prob")
        extra["rollout_log_prob"] = rollout_log_prob.detach()
    for name in needs.mini_batch_fields:
        if mini_batch_inputs is None or name not in mini_batch_inputs:
            raise ValueError(f"policy_loss {options.policy_loss!r} needs the mini-batch input {name!r}: call "
                             "prepare_policy_loss_inputs on the whole mini-batch and pass its rows as mini_batch_inputs")
        extra[name] = mini_batch_inputs[name].detach()
    terms = POLICY_LOSSES.get(options.policy_loss)(log_prob, old_log_prob, advantages, mask, options, **extra)
    per_token = terms.per_token_loss
    metrics: dict[str, torch.Tensor] = {}

    if rollout_log_prob is not None:
        rollout_log_prob = rollout_log_prob.detach()
        if correction.rejects:
            keep = rejection_keep_mask(old_log_prob, rollout_log_prob, mask, correction)
            if bool((loss_mask.bool() & ~keep).any()):
                raise ValueError(
                    "loss_mask still holds tokens the rollout rejection removes: call "
                    "apply_rollout_rejection on the mini-batch before compute_loss_normalisers"
                )
        is_weights = truncated_is_weights(old_log_prob, rollout_log_prob, mask, correction)
        if correction.is_cap is not None and not needs.rollout_log_prob:
            per_token = per_token * is_weights[0]
        metrics.update(mismatch_metrics(old_log_prob, rollout_log_prob, mask, normalisers, correction, is_weights))

    pg_loss = aggregate_loss(per_token, mask, mode, normalisers)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()
    metrics["pg_clipfrac"] = token_share(terms.clipped.to(mask.dtype), mask, normalisers)
    metrics["pg_clipfrac_lower"] = token_share(terms.clipped_lower.to(mask.dtype), mask, normalisers)
    metrics["ppo_kl"] = token_share(-terms.log_ratio, mask, normalisers)

    if entropy is not None:
        entropy_agg = aggregate_loss(entropy if options.entropy_coeff else entropy.detach(), mask, mode, normalisers)
        if options.entropy_coeff:
            loss = loss - options.entropy_coeff * entropy_agg
        metrics["entropy"] = entropy_agg.detach()

    if options.use_kl_loss:
        kl_loss = aggregate_loss(kl_divergence(log_prob, ref_log_prob.detach(), options.kl_loss_type), mask, mode, normalisers)
        loss = loss + options.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    return loss, metrics


def compute_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    normalisers: LossNormalisers,
    *,
    cliprange_value: float | None = 0.5,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO critic loss: 0.5 * aggregate(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)).

    values: `[batch, seq]` differentiable predictions; old_values: the predictions the returns were
    computed with; returns: GAE returns. cliprange_value None disables the clip. Metrics (summable
    shares): vf_loss, vf_clipfrac (the clipped term is strictly larger), vpred_mean.
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, loss_mask=loss_mask)
    LOSS_AGG_MODES.check(loss_agg_mode)
    mask = loss_mask.to(values.dtype)
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        per_token, clipped = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped_values = torch.minimum(torch.maximum(values, old_values - cliprange_value), old_values + cliprange_value)
        clipped_term = (clipped_values - returns) ** 2
        per_token, clipped = torch.maximum(unclipped, clipped_term), clipped_term > unclipped
    vf_loss = 0.5 * aggregate_loss(per_token, mask, loss_agg_mode, normalisers)
    return vf_loss, {
        "vf_loss": vf_loss.detach(),
        "vf_clipfrac": token_share(clipped.to(mask.dtype), mask, normalisers),
        "vpred_mean": token_share(values, mask, normalisers),
    }
