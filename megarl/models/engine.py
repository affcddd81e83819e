"""The Megatron side of the RL actor: log-probs of given tokens and training steps.

    engine = MegatronEngine(build_megatron_model(hf_dir, layout), EngineOptions(...))
    logprobs, entropy = engine.forward_logprobs(batch, temperature=1.0, with_entropy=True)
    result = engine.train_step(batch, loss_fn)       # one optimizer step
    for name, tensor in engine.export_hf_weights(): ...

A critic (built with `value_head=True`) has `forward_values` instead of `forward_logprobs`, and its
`train_step` hands `loss_fn` token-aligned values in place of log-probs (entropy None).

Every rank passes the same global `SequenceBatch`; the engine splits it across DP ranks and into
micro-batches (identically on every rank), runs megatron's pipeline schedule, and returns results
on every rank.

Gradient contract: `loss_fn(logprobs, entropy, micro_batch) -> (loss, metrics)` returns a loss that
is already normalised by the GLOBAL normaliser (e.g. the number of loss tokens in the whole global
batch), so the gradient of the step is the plain sum over micro-batches and DP ranks. megatron would
otherwise average: the pipeline schedule divides a loss by the number of micro-batches (and
multiplies it by CP), and DDP scales gradients by 1/DP. Setting `calculate_per_token_loss=True` on
the model config turns all of that off (DDP scale 1, no schedule scaling for a 3-tuple loss), and
the grad finaliser is called without a token count so nothing divides afterwards. MoE router losses
(aux / z loss, added inside the model) keep megatron's usual scale, the mean over micro-batches and
DP ranks, and ignore padding tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megarl.models.batch import MicroBatch, SequenceBatch, plan_micro_batches, sequence_alignment
from megarl.models.forward import (
    RankPosition,
    model_forward,
    run_schedule,
    share_across_world,
    token_scores,
    token_sum_pi_squared,
    token_values,
)
from megarl.models.optimizer import OptimizerOptions, build_optimizer, current_lr

LossFn = Callable[[torch.Tensor, "torch.Tensor | None", SequenceBatch], "tuple[torch.Tensor, dict]"]


@dataclass
class MicroBatchOptions:
    """How a DP rank's share is cut into micro-batches: by count or by token budget.

    `max_tokens_per_gpu` counts the tokens one GPU holds in a micro-batch, i.e. after the CP split
    (the micro-batch itself may hold `max_tokens_per_gpu * cp` tokens), as in verl.
    """

    micro_batch_size: int | None = None
    max_tokens_per_gpu: int | None = None  # default when neither is set: 4096
    packed: bool = True  # THD packing (no padding between sequences) vs padded [b, S] rows
    group_size: int = 1  # keep runs of this many consecutive sequences in one micro-batch (DPO pairs)

    @classmethod
    def from_config(cls, actor, *, for_log_prob: bool = False, micro_batch_size: int | None = None) -> "MicroBatchOptions":
        """From megarl.config's ActorConfig: by token budget with use_dynamic_bsz (the log-prob passes'
        budget with `for_log_prob`), else `micro_batch_size` sequences (default the actor's)."""
        if actor.use_dynamic_bsz:
            return cls(max_tokens_per_gpu=actor.log_prob_max_token_len_per_gpu if for_log_prob
                       else actor.max_token_len_per_gpu)
        return cls(micro_batch_size=micro_batch_size or actor.micro_batch_size)

    def __post_init__(self):
        if self.micro_batch_size is not None and self.max_tokens_per_gpu is not None:
            raise ValueError("set micro_batch_size or max_tokens_per_gpu, not both")
        if self.micro_batch_size is None and self.max_tokens_per_gpu is None:
            self.max_tokens_per_gpu = 4096


@dataclass
class EngineOptions:
    micro_batches: MicroBatchOptions = field(default_factory=MicroBatchOptions)
    optimizer: OptimizerOptions | None = field(default_factory=OptimizerOptions)  # None: inference only


@dataclass
class StepResult:
    """What one `train_step` did. `loss` and `metrics` are summed over micro-batches and DP ranks
    (loss_fn values are contributions to a global mean, so the sum is the global value)."""

    loss: float
    grad_norm: float
    lr: float
    update_successful: bool
    num_micro_batches: int
    metrics: dict[str, float]


class MegatronEngine:
    """Log-probs and training on a megatron-core model built by `build_megatron_model`.

    `handle.chunks` may be bare GPTModels (the engine wraps trainable ones in megatron DDP with the
    settings the gradient contract needs) or already DDP-wrapped ones whose config has
    `calculate_per_token_loss=True`.
    """

    def __init__(self, handle, options: EngineOptions | None = None):
        self.handle = handle
        self.options = options or EngineOptions()
        self.config = handle.config
        self.vocab_size = int(handle.hf_config.vocab_size)  # the model's may be padded beyond it
        if handle.layout.pp > 1:
            # micro-batches differ in length: pipeline stages exchange tensor shapes first
            self.config.variable_seq_lengths = True
        self.trainable = bool(handle.trainable) and self.options.optimizer is not None
        self.optimizer = self.scheduler = None
        if self.trainable:
            self._wrap_for_training()
            self.optimizer, self.scheduler = build_optimizer(self.handle.chunks, self.options.optimizer)
            self.config.grad_scale_func = self.optimizer.scale_loss

    # ------------------------------------------------------------------ setup

    def _wrap_for_training(self):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        chunks = self.handle.chunks
        already_wrapped = isinstance(chunks[0], DistributedDataParallel)
        if already_wrapped and not self.config.calculate_per_token_loss:
            raise ValueError(
                "the model chunks are DDP-wrapped without calculate_per_token_loss=True, so DDP would "
                "average gradients over DP; build with wrap_with_ddp=False and let the engine wrap them"
            )
        self.config.calculate_per_token_loss = True
        self._routers_without_token_scaling()
        if not already_wrapped:
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=self.options.optimizer.use_distributed_optimizer,
            )
            self.handle.chunks = [
                DistributedDataParallel(
                    config=self.config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0
                )
                for index, chunk in enumerate(chunks)
            ]
            self.handle.ddp_config = ddp_config

        def finalize_without_token_scaling(model, num_tokens=None, **kwargs):
            # num_tokens would divide every gradient by the global token count; the loss is
            # already globally normalised, so reduce only.
            return finalize_model_grads(model, None, **kwargs)

        self.config.finalize_model_grads_func = finalize_without_token_scaling
        no_sync = [chunk.no_sync for chunk in self.handle.chunks]
        self.config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]

    def _routers_without_token_scaling(self):
        """MoE routers built with calculate_per_token_loss=True multiply their aux/z losses by the
        local token count, expecting finalize_model_grads to divide every gradient by the global
        count. The engine never divides (the loss is globally normalised already), so the routers
        must not multiply; `_router_losses_averaged` gives them megatron's usual scale instead."""
        from megatron.core.transformer.moe.router import Router

        for chunk in self.handle.chunks:
            for module in chunk.modules():
                if isinstance(module, Router):
                    module.calculate_per_token_loss = False

    @contextlib.contextmanager
    def _router_losses_averaged(self, num_micro_batches: int, dp_size: int):
        """MoE aux and z losses (added inside the router, outside loss_fn) get the gradient scale
        megatron gives them by default: the mean over micro-batches and DP ranks. Under
        calculate_per_token_loss megatron scales them by 1 per micro-batch and DDP sums over DP,
        so the coefficients (read by the routers at every forward) are divided for the step."""
        factor = 1.0 / (num_micro_batches * dp_size)

        def scaled(coeff):
            if coeff is None:
                return None
            return [c * factor for c in coeff] if isinstance(coeff, (list, tuple)) else coeff * factor

        saved = self.config.moe_aux_loss_coeff, self.config.moe_z_loss_coeff
        self.config.moe_aux_loss_coeff, self.config.moe_z_loss_coeff = (scaled(c) for c in saved)
        try:
            yield
        finally:
            self.config.moe_aux_loss_coeff, self.config.moe_z_loss_coeff = saved

    # ------------------------------------------------------------------ planning

    def local_micro_batches(self, batch: SequenceBatch, micro_batches: MicroBatchOptions | None = None) -> list[MicroBatch]:
        """This DP rank's micro-batches of the global `batch` (same count on every DP rank)."""
        pos = self.rank_position()
        opts = micro_batches or self.options.micro_batches
        align = sequence_alignment(pos.cp_size, pos.tp_size, pos.sequence_parallel)
        max_tokens = None if opts.max_tokens_per_gpu is None else opts.max_tokens_per_gpu * pos.cp_size
        plan = plan_micro_batches(
            batch.lengths.tolist(), pos.dp_size, micro_batch_size=opts.micro_batch_size,
            max_tokens=max_tokens, align=align, group_size=opts.group_size,
        )
        return [MicroBatch.build(batch, idx, packed=opts.packed, align=align) for idx in plan.for_rank(pos.dp_rank)]

    def rank_position(self) -> RankPosition:
        return RankPosition.current(self.config)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def forward_logprobs(
        self,
        batch: SequenceBatch,
        temperature: float = 1.0,
        with_entropy: bool = False,
        *,
        micro_batches: MicroBatchOptions | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token-aligned log-probs (nats) and optionally entropy of `logits / temperature`, each
        `[B, S]` like `batch.input_ids` (0 at position 0 and padding), identical on every rank.
        `micro_batches` overrides the engine's micro-batching for this call."""
        if self.handle.value_head:
            raise RuntimeError("this engine holds a critic (value head): use forward_values")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        outputs = self._forward_only(batch, micro_batches, lambda logits, mb, pos: token_scores(
            logits, mb, pos, temperature, with_entropy, self.vocab_size), num_outputs=2 if with_entropy else 1)
        logprobs = outputs[0]
        return logprobs, (outputs[1] if with_entropy else None)

    @torch.no_grad()
    def forward_sum_pi_squared(
        self, batch: SequenceBatch, temperature: float = 1.0, *, micro_batches: MicroBatchOptions | None = None
    ) -> torch.Tensor:
        """Token-aligned sum over the vocabulary of p^2 of the next-token distribution at
        `temperature`, `[B, S]` like `batch.input_ids` (0 at position 0 and padding), identical on
        every rank (the optimal token baseline's variance proxy)."""
        if self.handle.value_head:
            raise RuntimeError("this engine holds a critic (value head): it has no token distribution")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return self._forward_only(batch, micro_batches, lambda logits, mb, pos: (token_sum_pi_squared(
            logits, mb, pos, temperature, self.vocab_size),), num_outputs=1)[0]

    @torch.no_grad()
    def forward_values(self, batch: SequenceBatch, *, micro_batches: MicroBatchOptions | None = None) -> torch.Tensor:
        """A critic's token-aligned values `[B, S]`: position t holds V(tokens < t) (see
        `forward.token_values`), 0 at position 0 and padding; identical on every rank."""
        if not self.handle.value_head:
            raise RuntimeError("forward_values needs a critic (build_megatron_model(..., value_head=True))")
        return self._forward_only(batch, micro_batches, lambda out, mb, pos: (token_values(out, mb, pos),), 1)[0]

    def _forward_only(
        self, batch: SequenceBatch, micro_batches: MicroBatchOptions | None, score, num_outputs: int
    ) -> list[torch.Tensor]:
        """Run the inference schedule; `score(output, mb, pos)` gives a tuple of `[b, L]` tensors per
        micro-batch, whose first `num_outputs` are returned scattered into `[B, S]` tensors on every rank."""
        pos = self.rank_position()
        micro_batches = self.local_micro_batches(batch, micro_batches)

        def forward_step(model, mb, inputs):
            output = model_forward(model, inputs)

            def collect(output, non_loss_data=True):
                return score(output, mb, pos)

            return output, collect

        was_training = [chunk.training for chunk in self.handle.chunks]
        for chunk in self.handle.chunks:
            chunk.eval()
        try:
            outputs = run_schedule(self.handle.chunks, micro_batches, forward_step, forward_only=True, pos=pos)
        finally:
            for chunk, mode in zip(self.handle.chunks, was_training):
                chunk.train(mode)

        shape = tuple(batch.input_ids.shape)
        results = []
        for k in range(num_outputs):
            full = torch.zeros(shape)
            if pos.is_last_stage:
                for mb, values in zip(micro_batches, outputs):
                    full[mb.indices, : values[k].size(1)] = values[k].float().cpu()
            results.append(share_across_world(full, pos))
        return results

    # ------------------------------------------------------------------ training

    def train_step(
        self,
        batch: SequenceBatch,
        loss_fn: LossFn,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        micro_batches: MicroBatchOptions | None = None,
    ) -> StepResult:
        """Forward/backward over all micro-batches, then one optimizer and lr-scheduler step.

        `loss_fn(logprobs [b, L], entropy [b, L] | None, micro_batch: SequenceBatch) -> (loss, metrics)`
        sees token-aligned tensors of the micro-batch's sequences (full sequences also under CP) and
        returns its scalar contribution to the globally normalised loss plus float metrics.
        """
        if not self.trainable:
            raise RuntimeError("this engine has no optimizer (built with trainable=False or optimizer=None)")
        pos = self.rank_position()
        micro_batches = self.local_micro_batches(batch, micro_batches)
        for chunk in self.handle.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        def forward_step(model, mb, inputs):
            output = model_forward(model, inputs)

            def loss_func(output):
                if self.handle.value_head:
                    logprobs, entropy = token_values(output, mb, pos), None  # values, for the critic's loss_fn
                else:
                    logprobs, entropy = token_scores(output, mb, pos, temperature, with_entropy, self.vocab_size)
                loss, metrics = loss_fn(logprobs, entropy, mb.sequences.to(logprobs.device))
                if loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
                reported = {"loss": loss.detach().clone().float()}
                reported.update({k: torch.as_tensor(v, dtype=torch.float32).detach().clone() for k, v in metrics.items()})
                # 3-tuple: with calculate_per_token_loss the schedule leaves the loss unscaled
                return loss, torch.tensor(mb.sequences.num_tokens, dtype=torch.int, device=loss.device), reported

            return output, loss_func

        with self._router_losses_averaged(len(micro_batches), pos.dp_size):
            outputs = run_schedule(self.handle.chunks, micro_batches, forward_step, forward_only=False, pos=pos)
        lr = current_lr(self.optimizer)  # the rate this update uses; the scheduler then advances
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        metrics = self._sum_metrics(outputs, pos)
        return StepResult(
            loss=metrics.pop("loss"), grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=lr, update_successful=bool(update_successful),
            num_micro_batches=len(micro_batches), metrics=metrics,
        )

    def _sum_metrics(self, outputs: list[dict], pos: RankPosition) -> dict[str, float]:
        """Sum per-micro-batch metrics over micro-batches and DP ranks; result on every rank."""
        local_keys = sorted({k for out in outputs for k in out}) if pos.is_last_stage else []
        all_keys: list = [None] * dist.get_world_size() if dist.is_initialized() else [local_keys]
        if dist.is_initialized():
            dist.all_gather_object(all_keys, local_keys)
        keys = sorted({k for ks in all_keys for k in ks})
        totals = torch.zeros(len(keys), dtype=torch.float64)
        for out in outputs if pos.is_last_stage else []:
            for i, k in enumerate(keys):
                if k in out:
                    totals[i] += float(out[k])
        totals = share_across_world(totals, pos)
        return {k: float(v) for k, v in zip(keys, totals)}

    # ------------------------------------------------------------------ weights

    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, streamed; every rank must iterate (it runs collectives)."""
        from megarl.models.export import export_hf_weights

        return export_hf_weights(self.handle)
