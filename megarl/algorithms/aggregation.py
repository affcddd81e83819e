"""Loss aggregation over the GLOBAL batch, and the masked statistics the estimators share.

Why global normalisers. A mini-batch is split into micro-batches (gradient accumulation) and across
data-parallel ranks. If each micro-batch divided by its own token count, the gradient would depend on
how the batch happened to be split (a micro-batch of 3 short answers would weigh as much as one of 3
long ones). Instead the trainer computes the denominators once per mini-batch over every micro-batch
and every DP rank (`compute_loss_normalisers`, one all-reduce), and each micro-batch returns

    loss_mb = sum(per-token or per-sequence contributions in mb) / global_normaliser

so the plain sum of micro-batch gradients over micro-batches and DP ranks is exactly the gradient of
the whole-batch loss. The engine therefore sums gradients (it undoes megatron's DP averaging).

Modes (`values`, `mask` are `[batch, seq]`; a "sequence" is a row with at least one mask token):
  token-mean               sum(values*mask) / global_num_tokens
  seq-mean-token-sum       sum(values*mask) / global_num_sequences
  seq-mean-token-mean      sum_seq( sum_t(values*mask) / num_tokens(seq) ) / global_num_sequences
  seq-mean-token-sum-norm  sum(values*mask) / (global_num_sequences * max_response_length)
  token-sum                sum(values*mask)          (no normaliser: verl 0.9.1's token-sum; the loss
                                                     scale grows with the batch's token count)
The last is Dr.GRPO's constant normaliser. verl divides by the padded width of the micro-batch tensor
(which changes with padding and micro-batching, and it omits the sequence count); here the constant
is the configured maximum response length, so the result does not depend on padding or splitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megarl.utils.registry import Registry

AggregateFn = Callable[[torch.Tensor, torch.Tensor, "LossNormalisers"], torch.Tensor]
LOSS_AGG_MODES: Registry[AggregateFn] = Registry("loss_agg_mode")


@dataclass(frozen=True)
class LossNormalisers:
    """Denominators for one mini-batch, summed over all its micro-batches and all DP ranks.

    num_tokens: loss tokens (mask == 1). num_sequences: rows with at least one loss token.
    max_response_length: the configured maximum response length (only seq-mean-token-sum-norm uses it).
    """

    num_tokens: float
    num_sequences: float
    max_response_length: int | None = None

    def __post_init__(self):
        if self.num_tokens < 0 or self.num_sequences < 0:
            raise ValueError(f"normalisers must be non-negative, got {self}")


def compute_loss_normalisers(
    loss_mask: torch.Tensor,
    *,
    max_response_length: int | None = None,
    dp_group=None,
) -> LossNormalisers:
    """Global normalisers of a mini-batch from this rank's share of its loss mask.

    loss_mask: `[batch, seq]` (bool or 0/1), ALL micro-batches of the mini-batch held by this rank
    (concatenate them, or call once per micro-batch and add the fields). If `dp_group` is given the
    counts are summed over it (one all-reduce; every rank of the group must call this). Without
    `dp_group` the counts are local: correct for one process only.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [batch, seq], got shape {tuple(loss_mask.shape)}")
    mask = loss_mask.to(torch.float64)
    counts = torch.stack([mask.sum(), (mask.sum(-1) > 0).to(torch.float64).sum()])
    if dp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=dp_group)
    num_tokens, num_sequences = counts.tolist()
    return LossNormalisers(num_tokens, num_sequences, max_response_length)


def _safe(denominator: float) -> float:
    # An empty mini-batch (everything masked) gives a zero loss, not NaN: all numerators are 0 too.
    return denominator if denominator > 0 else 1.0


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not multiply: a non-finite value in a masked position (padding) must not give NaN.
    return torch.where(mask > 0, values * mask, torch.zeros_like(values))


@LOSS_AGG_MODES.register("token-mean")
def _token_mean(values, mask, norm: LossNormalisers):
    return _masked(values, mask).sum() / _safe(norm.num_tokens)


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def _seq_mean_token_sum(values, mask, norm: LossNormalisers):
    return _masked(values, mask).sum() / _safe(norm.num_sequences)


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def _seq_mean_token_mean(values, mask, norm: LossNormalisers):
    per_seq = _masked(values, mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / _safe(norm.num_sequences)


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(values, mask, norm: LossNormalisers):
    if norm.max_response_length is None:
        raise ValueError(
            "loss_agg_mode 'seq-mean-token-sum-norm' needs max_response_length in the normalisers: "
            "pass compute_loss_normalisers(..., max_response_length=<configured max response tokens>)"
        )
    return _masked(values, mask).sum() / _safe(norm.num_sequences * norm.max_response_length)


@LOSS_AGG_MODES.register("token-sum")
def _token_sum(values, mask, norm: LossNormalisers):
    return _masked(values, mask).sum()


def aggregate_loss(
    values: torch.Tensor, mask: torch.Tensor, mode: str, normalisers: LossNormalisers | None = None
) -> torch.Tensor:
    """This micro-batch's share of the aggregated loss: a 0-dim tensor, differentiable in `values`.

    values, mask: `[batch, seq]`. normalisers: global ones from `compute_loss_normalisers`; None means
    "this tensor is the whole batch" (normalisers computed from `mask` here).
    """
    fn = LOSS_AGG_MODES.get(mode)
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if normalisers is None:
        normalisers = compute_loss_normalisers(mask, max_response_length=mask.shape[-1])
    return fn(values, mask.to(values.dtype), normalisers)


def token_share(values: torch.Tensor, mask: torch.Tensor, normalisers: LossNormalisers) -> torch.Tensor:
    """sum(values*mask) / global_num_tokens, detached: a token-mean metric's share (summable)."""
    return (_masked(values.detach(), mask).sum() / _safe(normalisers.num_tokens)).detach()


# ----------------------------------------------------------------------------------------------------
# Masked statistics (whole-batch, used by the advantage estimators)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the mask tokens, zero outside the mask.

    The variance is unbiased (n/(n-1)), as in verl; needs at least 2 mask tokens.
    """
    mask = mask.to(values.dtype)
    n = mask.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 loss tokens in the batch, got {int(n)}")
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / (n - 1)
    return (values - mean) * torch.rsqrt(var + eps) * mask
