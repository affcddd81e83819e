"""Rollout/train mismatch correction: truncated importance sampling (TIS) and rejection masking.

The rollout engine (vLLM, bf16, other kernels) samples from pi_rollout; the trainer recomputes the
same tokens' log-probs with its own numerics as old_log_prob (pi_old, same weights). The ratio
rho = pi_old / pi_rollout is 1 in exact arithmetic; in practice it drifts, and the drift biases the
policy gradient. Two remedies (Yao et al., "Your efficient RL framework secretly brings you
off-policy RL training", 2025; verl's rollout correction):

- truncated IS weight: the per-token policy loss is multiplied by min(rho, is_cap), detached.
- rejection: tokens (or whole sequences) with rho outside [reject_below, reject_above] are removed
  from the loss mask. Rejection changes the loss denominators, so it must happen BEFORE
  `compute_loss_normalisers`: call `apply_rollout_rejection` on the mini-batch, then compute the
  normalisers from the returned mask (`compute_policy_loss` checks that this was done).

level: "token" (rho per token), "sequence" (product over the sequence's loss tokens: the unbiased
but high-variance sequence IS weight), "geometric" (geometric mean of the token ratios).
All log-ratios are clamped to [-20, 20] before exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarl.algorithms.aggregation import LossNormalisers, token_share
from megarl.algorithms.kl import kl_k3

ROLLOUT_LOG_RATIO_CLAMP = 20.0
LEVELS = ("token", "sequence", "geometric")


@dataclass
class RolloutCorrectionOptions:
    """is_cap: cap of the truncated IS weight (None = no weighting). reject_above / reject_below:
    bounds on rho outside which tokens/sequences are masked (None = no bound)."""

    level: str = "token"
    is_cap: float | None = None
    reject_above: float | None = None
    reject_below: float | None = None

    @classmethod
    def from_config(cls, tis) -> "RolloutCorrectionOptions":
        """From megarl.config's TISConfig (algorithm.tis)."""
        return cls(level=tis.level, is_cap=tis.is_cap, reject_above=tis.reject_above, reject_below=tis.reject_below)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"unknown rollout correction level {self.level!r}; registered: {', '.join(LEVELS)}")
        if self.is_cap is not None and self.is_cap <= 0:
            raise ValueError(f"is_cap must be > 0 (typically 2.0), got {self.is_cap}")
        # rho == 1 must always be accepted: a fully rejected sequence then stays accepted on re-check.
        if self.reject_above is not None and self.reject_above <= 1.0:
            raise ValueError(f"reject_above must be > 1, got {self.reject_above}")
        if self.reject_below is not None and not 0.0 <= self.reject_below < 1.0:
            raise ValueError(f"reject_below must lie in [0, 1), got {self.reject_below}")

    @property
    def rejects(self) -> bool:
        return self.reject_above is not None or self.reject_below is not None


def rollout_log_ratio(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, loss_mask: torch.Tensor, level: str
) -> torch.Tensor:
    """log rho per token at `level`, `[batch, seq]`, detached; sequence levels broadcast per row."""
    mask = loss_mask.to(old_log_prob.dtype)
    token = (old_log_prob.detach() - rollout_log_prob) * mask
    if level == "token":
        log_rho = token
    elif level == "sequence":
        log_rho = token.sum(-1, keepdim=True).expand_as(token)
    elif level == "geometric":
        log_rho = (token.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(token)
    else:
        raise ValueError(f"unknown rollout correction level {level!r}; registered: {', '.join(LEVELS)}")
    return log_rho.clamp(-ROLLOUT_LOG_RATIO_CLAMP, ROLLOUT_LOG_RATIO_CLAMP)


def truncated_is_weights(
    old_log_prob, rollout_log_prob, loss_mask, options: RolloutCorrectionOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, capped): min(rho, is_cap) and where the cap bit, `[batch, seq]`, detached."""
    rho = rollout_log_ratio(old_log_prob, rollout_log_prob, loss_mask, options.level).exp()
    if options.is_cap is None:
        return torch.ones_like(rho), torch.zeros_like(rho, dtype=torch.bool)
    return rho.clamp(max=options.is_cap), rho > options.is_cap


def rejection_keep_mask(old_log_prob, rollout_log_prob, loss_mask, options: RolloutCorrectionOptions) -> torch.Tensor:
    """`[batch, seq]` bool: True where rho lies within the rejection bounds."""
    rho = rollout_log_ratio(old_log_prob, rollout_log_prob, loss_mask, options.level).exp()
    keep = torch.ones_like(rho, dtype=torch.bool)
    if options.reject_above is not None:
        keep &= rho <= options.reject_above
    if options.reject_below is not None:
        keep &= rho >= options.reject_below
    return keep


def apply_rollout_rejection(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    loss_mask: torch.Tensor,
    options: RolloutCorrectionOptions,
    *,
    dp_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Remove rejected tokens/sequences from this rank's mini-batch loss mask (before normalisers).

    Returns (new_mask like loss_mask, metrics): mismatch/rejected_token_fraction and
    mismatch/rejected_seq_fraction (sequences that lost at least one token), over the whole
    mini-batch (summed over `dp_group` if given; every rank must call).
    """
    bool_mask = loss_mask.bool()
    if not options.rejects:
        new_mask = loss_mask
        rejected = torch.zeros_like(bool_mask)
    else:
        rejected = bool_mask & ~rejection_keep_mask(old_log_prob, rollout_log_prob, loss_mask, options)
        new_mask = loss_mask * (~rejected).to(loss_mask.dtype) if loss_mask.dtype != torch.bool else bool_mask & ~rejected
    counts = torch.stack([
        rejected.sum(), bool_mask.sum(), rejected.any(-1).sum(), bool_mask.any(-1).sum()
    ]).to(torch.float64)
    if dp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=dp_group)
    metrics = {
        "mismatch/rejected_token_fraction": counts[0] / counts[1].clamp(min=1),
        "mismatch/rejected_seq_fraction": counts[2] / counts[3].clamp(min=1),
    }
    return new_mask, metrics


def mismatch_metrics(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    loss_mask: torch.Tensor,
    normalisers: LossNormalisers,
    options: RolloutCorrectionOptions,
    is_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Token-mean metrics (each this micro-batch's summable share, see loss.py):
    mismatch/log_prob_abs_diff  mean |log pi_old - log pi_rollout|
    mismatch/k3_kl              k3 estimate of KL(pi_rollout || pi_old) (samples come from rollout)
    mismatch/is_weight_mean     mean truncated IS weight (1 when is_cap is None)
    mismatch/is_capped_fraction fraction of loss tokens whose weight hit is_cap
    is_weights: `truncated_is_weights(...)` if already computed.
    """
    mask = loss_mask.to(old_log_prob.dtype)
    old = old_log_prob.detach()
    weights, capped = is_weights or truncated_is_weights(old, rollout_log_prob, loss_mask, options)
    return {
        "mismatch/log_prob_abs_diff": token_share((old - rollout_log_prob).abs(), mask, normalisers),
        "mismatch/k3_kl": token_share(kl_k3(rollout_log_prob, old), mask, normalisers),
        "mismatch/is_weight_mean": token_share(weights, mask, normalisers),
        "mismatch/is_capped_fraction": token_share(capped.to(mask.dtype), mask, normalisers),
    }
