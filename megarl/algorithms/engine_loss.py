"""Adapters from the losses to the engine's `loss_fn(logprobs, entropy, micro_batch)` contract.

The engine (megarl.models.engine) hands each micro-batch's token-aligned tensors to `loss_fn` as a
`SequenceBatch` whose `fields` hold the per-token inputs, and SUMS the returned loss gradients and
metrics over micro-batches and DP ranks. Every rank holds the same global batch, so the normalisers
are computed once from its loss mask with no communication:

    mask, rej = apply_rollout_rejection(old, rollout, batch.fields["loss_mask"], options.rollout_correction)
    batch = batch.with_fields(loss_mask=mask, **prepare_policy_loss_inputs(options, old, advantages, mask))
    normalisers = compute_loss_normalisers(mask, max_response_length=cfg.max_response_length)
    engine.train_step(batch, policy_loss_fn(options, normalisers), with_entropy=options.entropy_coeff != 0)

(Call once per mini-batch, i.e. per optimizer step.) Only duck typing on `micro_batch.fields`: no
import of megarl.models here.
"""

from __future__ import annotations

from dataclasses import dataclass

from megarl.algorithms.aggregation import LossNormalisers
from megarl.algorithms.loss import PolicyLossOptions, compute_policy_loss, compute_value_loss
from megarl.algorithms.policy_losses import policy_loss_needs
from megarl.algorithms.preference import compute_sft_loss


@dataclass(frozen=True)
class PolicyLossFields:
    """Names of the per-token `[b, S]` fields the policy loss reads from the micro-batch."""

    loss_mask: str = "loss_mask"
    old_log_prob: str = "old_logprobs"
    advantages: str = "advantages"
    ref_log_prob: str = "ref_logprobs"
    rollout_log_prob: str = "rollout_logprobs"


def policy_loss_fn(options: PolicyLossOptions, normalisers: LossNormalisers, fields: PolicyLossFields = PolicyLossFields()):
    """A `loss_fn` for `engine.train_step` computing `compute_policy_loss` on each micro-batch.

    old_logprobs missing = on-policy (log_prob.detach()); ref_logprobs is read only with use_kl_loss;
    rollout_logprobs is read when present (TIS and mismatch metrics); the policy loss's mini-batch
    inputs (`prepare_policy_loss_inputs`, e.g. cov_selected) are read by their field names."""
    mini_batch_fields = policy_loss_needs(options.policy_loss).mini_batch_fields

    def loss_fn(logprobs, entropy, micro_batch):
        f = micro_batch.fields
        missing = [name for name in mini_batch_fields if name not in f]
        if missing:
            raise ValueError(f"policy_loss {options.policy_loss!r} needs mini-batch fields {missing}: attach "
                             "prepare_policy_loss_inputs(...) to the mini-batch before train_step")
        old = f.get(fields.old_log_prob)
        return compute_policy_loss(
            logprobs,
            logprobs.detach() if old is None else old,
            f[fields.advantages],
            f[fields.loss_mask],
            normalisers,
            options,
            ref_log_prob=f[fields.ref_log_prob] if options.use_kl_loss else None,
            rollout_log_prob=f.get(fields.rollout_log_prob),
            entropy=entropy,
            mini_batch_inputs={name: f[name] for name in mini_batch_fields},
        )

    return loss_fn


def sft_loss_fn(normalisers: LossNormalisers, *, loss_agg_mode: str = "token-mean", loss_mask_field: str = "loss_mask"):
    """A `loss_fn` for `engine.train_step` computing the SFT cross-entropy on each micro-batch."""

    def loss_fn(logprobs, entropy, micro_batch):
        return compute_sft_loss(logprobs, micro_batch.fields[loss_mask_field], normalisers, loss_agg_mode=loss_agg_mode)

    return loss_fn


def value_loss_fn(
    normalisers: LossNormalisers,
    *,
    cliprange_value: float | None = 0.5,
    loss_agg_mode: str = "token-mean",
    fields: tuple[str, str, str] = ("old_values", "returns", "loss_mask"),
):
    """A `loss_fn` for a critic engine's `train_step` (which passes token-aligned values in place of
    log-probs): the clipped value loss of `compute_value_loss` against the micro-batch's old values
    and returns. old_values missing = no clipping reference (values.detach())."""
    old_field, returns_field, mask_field = fields

    def loss_fn(values, _entropy, micro_batch):
        f = micro_batch.fields
        old = f.get(old_field)
        return compute_value_loss(
            values, values.detach() if old is None else old, f[returns_field], f[mask_field], normalisers,
            cliprange_value=cliprange_value, loss_agg_mode=loss_agg_mode,
        )

    return loss_fn
