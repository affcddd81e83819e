"""Per-token log-probs and entropy over a tensor-parallel (vocab-sharded) output layer.

megatron's output layer leaves the logits split over TP ranks along the vocabulary (`parallel_output`).
The RL losses need, per token, log p(target) and the entropy of the (temperature-scaled)
distribution. Gathering `[tokens, vocab]` would cost tokens x vocab floats per rank; this module
instead reduces three `[tokens]` vectors over the TP group (like megatron's
`vocab_parallel_cross_entropy`, which gives log-probs only):

  max_v logit (MAX)  ->  sum_v exp(logit - max) (SUM)  ->  target logit from the rank owning the
  target id (SUM)  ->  sum_v p_v * logit_v (SUM, entropy only)

With x = logits / T shifted by the max, Z = sum exp(x), log p = x - log Z:
  logprob(t) = x_t - log Z,     entropy = log Z - sum_v p_v x_v
  d logprob / dx_v = 1[v=t] - p_v,     d entropy / dx_v = -p_v (log p_v + entropy)
Gradients w.r.t. the logits are these divided by T; each rank computes its own vocab slice, so the
backward needs no communication.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _default_tp_group():
    """megatron's TP group when its parallel state is initialised, else None (single shard)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target_ids, tp_group, temperature: float, with_entropy: bool):
        shard_size = logits.size(-1)
        rank = dist.get_rank(tp_group) if tp_group is not None and dist.get_world_size(tp_group) > 1 else 0
        vocab_start = rank * shard_size

        x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        x_max = x.max(dim=-1, keepdim=True).values
        _all_reduce(x_max, dist.ReduceOp.MAX, tp_group)
        x = x - x_max
        sum_exp = x.exp().sum(dim=-1, keepdim=True)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group)
        log_probs = x - sum_exp.log()  # [..., shard]: log p of this rank's vocab slice

        local_target = target_ids - vocab_start
        owned = (local_target >= 0) & (local_target < shard_size)
        safe_target = torch.where(owned, local_target, torch.zeros_like(local_target)).unsqueeze(-1)
        target_logprob = torch.gather(log_probs, -1, safe_target).squeeze(-1)
        target_logprob = torch.where(owned, target_logprob, torch.zeros_like(target_logprob))
        _all_reduce(target_logprob, dist.ReduceOp.SUM, tp_group)

        if with_entropy:
            # entropy = -sum p log p, reduced over the vocab shards
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
            _all_reduce(entropy, dist.ReduceOp.SUM, tp_group)
        else:
            entropy = torch.zeros_like(target_logprob)
            ctx.mark_non_differentiable(entropy)

        ctx.save_for_backward(log_probs, safe_target.squeeze(-1), owned, entropy)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.logits_dtype = logits.dtype
        return target_logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        log_probs, safe_target, owned, entropy = ctx.saved_tensors
        probs = log_probs.exp()
        grad_x = torch.zeros_like(log_probs)
        if grad_logprob is not None:
            grad_x -= probs * grad_logprob.unsqueeze(-1)
            onehot = torch.zeros_like(log_probs).scatter_(-1, safe_target.unsqueeze(-1), 1.0)
            grad_x += onehot * (owned.to(log_probs.dtype) * grad_logprob).unsqueeze(-1)
        if ctx.with_entropy and grad_entropy is not None:
            grad_x -= probs * (log_probs + entropy.unsqueeze(-1)) * grad_entropy.unsqueeze(-1)
        grad_logits = (grad_x / ctx.temperature).to(ctx.logits_dtype)
        return grad_logits, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of each target token and entropy of softmax(logits / temperature), over TP shards.

    logits: `[..., vocab / tp]`, this rank's contiguous vocab slice (rank r holds ids
        `[r * vocab/tp, (r+1) * vocab/tp)`, megatron's VocabParallel layout); any float dtype,
        computed in fp32 (fp64 stays fp64).
    target_ids: `[...]` int64 ids in the full vocabulary.
    tp_group: the TP group; None = megatron's TP group if its parallel state is initialised, else
        the logits are the whole vocabulary.
    Returns `(logprobs [...], entropy [...] or None)`, fp32 (fp64 for fp64 logits), in nats; both differentiable w.r.t. logits.
    Identical on every TP rank.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target_ids {tuple(target_ids.shape)} disagree: "
                         "logits must be [..., vocab_shard] for target_ids [...]")
    if tp_group is None:
        tp_group = _default_tp_group()
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    vocab = logits.size(-1) * tp_size
    if target_ids.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= vocab):
        raise ValueError(f"target ids must lie in [0, {vocab}); got min {int(target_ids.min())}, max {int(target_ids.max())}")
    logprobs, entropy = _VocabParallelLogprobEntropy.apply(logits, target_ids.long(), tp_group, float(temperature), with_entropy)
    return logprobs, (entropy if with_entropy else None)


@torch.no_grad()
def vocab_parallel_sum_squared_probs(
    logits: torch.Tensor, tp_group: Optional[dist.ProcessGroup] = None, temperature: float = 1.0
) -> torch.Tensor:
    """sum_v p_v^2 of softmax(logits / temperature) over the TP vocab shards, `[...]` (no gradient).

    The optimal token baseline's variance proxy needs it (||grad log p_t||^2 ~ 1 - 2 p_t + sum p^2).
    Two reductions over the TP group: max (MAX), then [sum exp(x), sum exp(2x)] (SUM) with x the
    max-shifted logits, so sum p^2 = sum exp(2x) / (sum exp(x))^2. logits as in
    `vocab_parallel_logprobs_entropy`; fp32 (fp64 stays fp64); identical on every TP rank.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tp_group is None:
        tp_group = _default_tp_group()
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    x_max = x.max(dim=-1, keepdim=True).values
    _all_reduce(x_max, dist.ReduceOp.MAX, tp_group)
    x = x - x_max
    sums = torch.stack([x.exp().sum(-1), (2 * x).exp().sum(-1)])
    _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
    return sums[1] / sums[0].square()
