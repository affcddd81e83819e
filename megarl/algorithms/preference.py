"""SFT cross-entropy and DPO losses on the same per-token log-prob path as the RL losses.

Inputs are per-token log-probs `[batch, seq]` aligned with input_ids (nats) and 0/1 loss masks, as
the engine's forward_logprobs returns them. Like the RL losses, each call returns this micro-batch's
share of the loss against global normalisers (token/sequence counts, or the global number of pairs)
so gradients sum exactly over micro-batches and DP ranks.

DPO (Rafailov et al., 2023), h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
  sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing)
           with sequence log-probs = SUM of token log-probs
  ipo      (h - 1 / (2 beta))^2  (Azar et al., 2023), with sequence log-probs = MEAN of token
           log-probs (the length-normalised form IPO implementations use)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megarl.algorithms.aggregation import LossNormalisers, aggregate_loss, token_share
from megarl.utils.registry import Registry


def sequence_log_prob(log_prob: torch.Tensor, loss_mask: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """`[batch]` log-prob of each sequence's masked tokens: their sum, or their mean."""
    mask = loss_mask.to(log_prob.dtype)
    total = (log_prob * mask).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; registered: mean, sum")


def compute_sft_loss(
    log_prob: torch.Tensor,
    loss_mask: torch.Tensor,
    normalisers: LossNormalisers,
    *,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy -log p(token) aggregated over the mask. Metrics (summable shares): sft_loss,
    and nll_token_mean (the token-mean whatever the mode, for perplexity = exp of its total)."""
    mask = loss_mask.to(log_prob.dtype)
    loss = aggregate_loss(-log_prob, mask, loss_agg_mode, normalisers)
    return loss, {"sft_loss": loss.detach(), "nll_token_mean": token_share(-log_prob, mask, normalisers)}


# ----------------------------------------------------------------------------------------------------
# DPO


@dataclass(frozen=True)
class DPOLossKind:
    per_pair_loss: Callable[[torch.Tensor, "DPOOptions"], torch.Tensor]
    sequence_reduction: str


DPO_LOSSES: Registry[DPOLossKind] = Registry("dpo loss type")


@dataclass
class DPOOptions:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, dpo) -> "DPOOptions":
        """From megarl.config's DPOConfig."""
        return cls(beta=dpo.beta, loss_type=dpo.loss_type, label_smoothing=dpo.label_smoothing)

    def __post_init__(self):
        DPO_LOSSES.check(self.loss_type)
        if self.beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")


def _sigmoid_loss(h: torch.Tensor, options: DPOOptions) -> torch.Tensor:
    eps = options.label_smoothing
    return -(1 - eps) * F.logsigmoid(options.beta * h) - eps * F.logsigmoid(-options.beta * h)


def _ipo_loss(h: torch.Tensor, options: DPOOptions) -> torch.Tensor:
    return (h - 1.0 / (2.0 * options.beta)) ** 2


DPO_LOSSES.register("sigmoid")(DPOLossKind(_sigmoid_loss, "sum"))
DPO_LOSSES.register("ipo")(DPOLossKind(_ipo_loss, "mean"))


def compute_dpo_loss(
    chosen_log_prob: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_log_prob: torch.Tensor,
    rejected_mask: torch.Tensor,
    ref_chosen_log_prob: torch.Tensor,
    ref_rejected_log_prob: torch.Tensor,
    options: DPOOptions,
    *,
    num_pairs: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss of this micro-batch's pairs: sum of per-pair losses / num_pairs (the GLOBAL pair
    count; None = this micro-batch is everything). Per-token tensors `[pairs, seq]`; row i of the
    chosen tensors pairs with row i of the rejected ones. Metrics (summable shares over pairs):
    dpo_loss, rewards/chosen, rewards/rejected (beta * policy-minus-ref sequence log-prob),
    rewards/margins, rewards/accuracies (fraction of pairs with chosen reward > rejected reward).
    """
    if chosen_log_prob.shape[0] != rejected_log_prob.shape[0]:
        raise ValueError(f"{chosen_log_prob.shape[0]} chosen vs {rejected_log_prob.shape[0]} rejected sequences")
    kind = DPO_LOSSES.get(options.loss_type)
    reduce = kind.sequence_reduction
    pi_w = sequence_log_prob(chosen_log_prob, chosen_mask, reduce)
    pi_l = sequence_log_prob(rejected_log_prob, rejected_mask, reduce)
    ref_w = sequence_log_prob(ref_chosen_log_prob.detach(), chosen_mask, reduce)
    ref_l = sequence_log_prob(ref_rejected_log_prob.detach(), rejected_mask, reduce)
    h = (pi_w - pi_l) - (ref_w - ref_l)
    denominator = float(num_pairs) if num_pairs is not None else float(h.shape[0])
    denominator = denominator if denominator > 0 else 1.0
    loss = kind.per_pair_loss(h, options).sum() / denominator
    reward_w, reward_l = options.beta * (pi_w - ref_w).detach(), options.beta * (pi_l - ref_l).detach()
    return loss, {
        "dpo_loss": loss.detach(),
        "rewards/chosen": reward_w.sum() / denominator,
        "rewards/rejected": reward_l.sum() / denominator,
        "rewards/margins": (reward_w - reward_l).sum() / denominator,
        "rewards/accuracies": (reward_w > reward_l).to(reward_w.dtype).sum() / denominator,
    }
