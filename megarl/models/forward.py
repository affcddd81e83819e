"""Per-token log-probs and entropy through megatron's pipeline schedule, vocab-parallel.

The model runs with `labels=None` and `parallel_output=True`, so the last pipeline stage holds logits
`[rows, s_local, vocab/tp]` (this rank's vocab shard and CP piece). They are scored at the next-token
labels by `vocab_parallel_logprobs_entropy` (never gathering `[tokens, vocab]`), the CP pieces are
gathered into full sequences (differentiably), and `MicroBatch.aligned` turns them into token-aligned
`[b, max_len]` values. `run_schedule` drives `get_forward_backward_func()` for both inference and
training; results are made available on every rank by `share_across_world`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megarl.models.batch import MicroBatch


@dataclass(frozen=True)
class RankPosition:
    """Where this rank sits in megatron's parallel state (read once per call)."""

    dp_size: int
    dp_rank: int
    cp_size: int
    cp_rank: int
    tp_size: int
    tp_rank: int
    is_last_stage: bool
    sequence_parallel: bool

    @classmethod
    def current(cls, config) -> "RankPosition":
        from megatron.core import parallel_state as mpu

        return cls(
            dp_size=mpu.get_data_parallel_world_size(),
            dp_rank=mpu.get_data_parallel_rank(),
            cp_size=mpu.get_context_parallel_world_size(),
            cp_rank=mpu.get_context_parallel_rank(),
            tp_size=mpu.get_tensor_model_parallel_world_size(),
            tp_rank=mpu.get_tensor_model_parallel_rank(),
            is_last_stage=mpu.is_pipeline_last_stage(ignore_virtual=True),
            sequence_parallel=bool(config.sequence_parallel),
        )

    @property
    def owns_results(self) -> bool:
        """One rank per DP replica publishes results: last PP stage, TP rank 0, CP rank 0."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """THD parameters over the padded sequence boundaries (padding is trailing, inside each sequence)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
    )


def model_forward(model, inputs: dict) -> torch.Tensor:
    """One chunk's forward on CP-local inputs: logits `[rows, s_local, vocab/tp]` on the last stage,
    hidden states to send on other stages. `padding_mask` keeps padding out of MoE router losses
    (aux / z loss); it does not change the logits of real tokens."""
    psp = packed_seq_params(inputs["cu_seqlens"], inputs["max_seqlen"]) if "cu_seqlens" in inputs else None
    return model(
        inputs["input_ids"], inputs["position_ids"], None, labels=None, packed_seq_params=psp,
        padding_mask=_padding_mask_for_stage(model, inputs["padding_mask"]),
    )


def _padding_mask_for_stage(model, padding_mask: torch.Tensor) -> torch.Tensor:
    """megatron (0.16.1) splits the padding mask along the sequence for sequence parallelism only
    on the first pipeline stage; later stages would get the full mask against TP-split hidden
    states (a shape error in the router's z-loss). Split it here for them the same way."""
    from megatron.core import tensor_parallel

    from megarl.models.bridge import unwrap_chunk

    inner = unwrap_chunk(model)
    if inner.pre_process or not inner.config.sequence_parallel:
        return padding_mask
    split = tensor_parallel.scatter_to_sequence_parallel_region(padding_mask.transpose(0, 1).contiguous())
    return split.transpose(0, 1).contiguous()


# Far below any real logit, yet finite: exp() underflows to 0 and 0 * (-1e30) stays 0 in entropy.
_EXCLUDED_LOGIT = -1e30


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int | None, tp_rank: int) -> torch.Tensor:
    """Exclude the rows megatron adds to pad the vocabulary (to a multiple of 128*TP, say): they
    are not tokens, and their logits would otherwise take probability mass. `logits` is this TP
    rank's shard `[..., vocab_padded/tp]`."""
    local = logits.size(-1)
    start = tp_rank * local
    if vocab_size is None or start + local <= vocab_size:
        return logits
    padding = torch.arange(start, start + local, device=logits.device) >= vocab_size
    return logits.masked_fill(padding, _EXCLUDED_LOGIT)


def score_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool, vocab_size: int | None = None
):
    """Next-token log-probs (nats) and entropy of `logits / temperature`, both `[rows, s_local]`."""
    from megatron.core import parallel_state as mpu

    from megarl.models.vocab_parallel import vocab_parallel_logprobs_entropy

    logits = mask_vocab_padding(logits, vocab_size, mpu.get_tensor_model_parallel_rank())
    return vocab_parallel_logprobs_entropy(
        logits, labels, tp_group=mpu.get_tensor_model_parallel_group(), temperature=temperature,
        with_entropy=with_entropy,
    )


class _GatherContextParallel(torch.autograd.Function):
    """All-gather CP pieces `[rows, s_local]` into the full layout `[rows, s_layout]`.

    Every CP rank then computes the same loss from the same full tensor, so the gradient of the full
    tensor is identical on all CP ranks and this rank's piece receives exactly its own slice (no
    reduction: DDP sums the parameter gradients of the CP ranks, each from its own tokens).
    """

    @staticmethod
    def forward(ctx, local, indices, own_index, full_len, group):
        pieces = [torch.empty_like(local) for _ in indices]
        dist.all_gather(pieces, local.contiguous(), group=group)
        full = local.new_zeros(*local.shape[:-1], full_len)
        for idx, piece in zip(indices, pieces):
            full[..., idx.to(local.device)] = piece
        ctx.own_index = own_index.to(local.device)
        return full

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[..., ctx.own_index], None, None, None, None


def gather_context_parallel(local: torch.Tensor, mb: MicroBatch, pos: RankPosition) -> torch.Tensor:
    """CP-local next-token values `[rows, s_local]` -> full layout `[rows, s_layout]` (differentiable)."""
    if pos.cp_size == 1:
        return local
    from megatron.core import parallel_state as mpu

    indices = [mb.cp_index(pos.cp_size, r) for r in range(pos.cp_size)]
    return _GatherContextParallel.apply(
        local, indices, indices[pos.cp_rank], mb.tokens.size(1), mpu.get_context_parallel_group()
    )


def token_scores(
    logits, mb: MicroBatch, pos: RankPosition, temperature: float, with_entropy: bool, vocab_size: int | None = None
):
    """Token-aligned log-probs and entropy `[b, max_len]` of a micro-batch, from last-stage logits.

    Position t holds log p(token t | tokens < t) and the entropy of that distribution; 0 at t = 0
    and at padding. Identical on every TP and CP rank of the replica. `vocab_size` is the real
    vocabulary (columns beyond it are megatron's padding and are excluded).
    """
    labels = mb.model_inputs(pos.cp_size, pos.cp_rank, device=logits.device)["labels"]
    logprobs, entropy = score_logits(logits, labels, temperature, with_entropy, vocab_size)
    logprobs = mb.aligned(gather_context_parallel(logprobs, mb, pos))
    if entropy is not None:
        entropy = mb.aligned(gather_context_parallel(entropy, mb, pos))
    return logprobs, entropy


def token_sum_pi_squared(logits, mb: MicroBatch, pos: RankPosition, temperature: float, vocab_size: int | None = None):
    """Token-aligned sum_v p_v^2 `[b, max_len]` of the next-token distribution at `temperature`
    (position t: the distribution token t was drawn from), 0 at t = 0 and at padding; no gradient."""
    from megatron.core import parallel_state as mpu

    from megarl.models.vocab_parallel import vocab_parallel_sum_squared_probs

    logits = mask_vocab_padding(logits, vocab_size, mpu.get_tensor_model_parallel_rank())
    local = vocab_parallel_sum_squared_probs(logits, mpu.get_tensor_model_parallel_group(), temperature)
    return mb.aligned(gather_context_parallel(local, mb, pos))


def token_values(output: torch.Tensor, mb: MicroBatch, pos: RankPosition) -> torch.Tensor:
    """Token-aligned critic values `[b, max_len]` from a value model's last-stage output
    `[rows, s_local, 1]`: position t holds V(tokens < t), the head's output at position t-1 (the
    state before token t is generated), 0 at t = 0 and at padding. Identical on every TP/CP rank."""
    return mb.aligned(gather_context_parallel(output[..., 0], mb, pos))


def run_schedule(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    forward_step: Callable,
    *,
    forward_only: bool,
    pos: RankPosition,
) -> list:
    """Run megatron's forward(-backward) schedule over this DP rank's micro-batches.

    `forward_step(model, micro_batch, local_inputs) -> (output, loss_func)`; each chunk (VPP) reads
    its own iterator over the same micro-batches. Returns the schedule's per-micro-batch store
    (non-empty on the last stage only). `seq_length` is the longest layout; with
    `variable_seq_lengths` the stages exchange actual shapes, so micro-batches may differ in length.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarl.platform.device import current_device

    device = current_device()

    def step(data_iterator, model):
        mb = next(data_iterator)
        inputs = mb.model_inputs(pos.cp_size, pos.cp_rank, device=device)
        return forward_step(model, mb, inputs)

    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=max(mb.tokens.size(1) for mb in micro_batches),
        micro_batch_size=max(mb.tokens.size(0) for mb in micro_batches),
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )


def share_across_world(local: torch.Tensor, pos: RankPosition) -> torch.Tensor:
    """Every rank gets the sum of the owning ranks' tensors (owners write disjoint entries, the
    others contribute zeros), so results computed on the last stage reach every rank exactly.
    The collective runs on this rank's device; the result is returned on the CPU."""
    from megarl.platform.device import current_device

    out = local.to(current_device()) if pos.owns_results else torch.zeros_like(local, device=current_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out.cpu()
