"""One Megatron training rank: the actor, the frozen reference and (PPO) the critic, their
log-probs / values, updates, weight pushes and checkpoints. The trainer drives a group of these
(one per rank) in lock step.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megarl.checkpoint.store import CRITIC_SUBDIR
from megarl.config.schema import MegaRLConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parallel_layout(cfg: MegaRLConfig):
    from megarl.distributed import ParallelLayout

    p = cfg.parallel
    return ParallelLayout(
        tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, etp=p.etp, cp=p.cp, sequence_parallel=p.sequence_parallel,
        num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage,
    )


def optimizer_options(cfg: MegaRLConfig, total_optimizer_steps: int, o=None):
    """megatron optimizer options from `o` (an OptimizerConfig; default the actor's `cfg.optimizer`)."""
    from megarl.models.optimizer import OptimizerOptions

    o = o or cfg.optimizer
    decay_steps = o.lr_decay_steps or max(total_optimizer_steps, o.lr_warmup_steps + 1)
    return OptimizerOptions(
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps, clip_grad=o.clip_grad, lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=o.lr_decay_style,
        use_distributed_optimizer=o.use_distributed_optimizer, bf16=cfg.model.dtype == "bf16",
        optimizer_cpu_offload=o.optimizer_cpu_offload, optimizer_offload_fraction=o.optimizer_offload_fraction,
        overlap_cpu_optimizer_d2h_h2d=o.overlap_cpu_optimizer_d2h_h2d,
        use_precision_aware_optimizer=o.use_precision_aware_optimizer,
    )


def micro_batch_options(cfg: MegaRLConfig, for_log_prob: bool = False, critic: bool = False):
    """The actor's micro-batching (the critic's with `critic`: its own micro_batch_size, the actor's
    token budgets)."""
    from megarl.models.engine import MicroBatchOptions

    a = cfg.actor
    if a.use_dynamic_bsz:
        budget = a.log_prob_max_token_len_per_gpu if for_log_prob else a.max_token_len_per_gpu
        return MicroBatchOptions(max_tokens_per_gpu=budget)
    return MicroBatchOptions(micro_batch_size=cfg.critic.micro_batch_size if critic else a.micro_batch_size)


def policy_loss_options(cfg: MegaRLConfig):
    from megarl.algorithms import PolicyLossOptions, RolloutCorrectionOptions

    a = cfg.algorithm
    return PolicyLossOptions(
        policy_loss=a.policy_loss, clip_ratio=a.clip_ratio, clip_ratio_low=a.clip_ratio_low,
        clip_ratio_high=a.clip_ratio_high, clip_ratio_c=a.clip_ratio_c, loss_agg_mode=a.loss_agg_mode,
        use_kl_loss=a.use_kl_loss, kl_loss_coef=a.kl_loss_coef, kl_loss_type=a.kl_loss_type,
        entropy_coeff=a.entropy_coeff,
        rollout_correction=RolloutCorrectionOptions(
            level=a.tis.level, is_cap=a.tis.is_cap, reject_above=a.tis.reject_above, reject_below=a.tis.reject_below
        ),
    )


def needs_reference(cfg: MegaRLConfig) -> bool:
    return cfg.algorithm.use_kl_loss or cfg.algorithm.use_kl_in_reward


def uses_critic(cfg: MegaRLConfig) -> bool:
    return cfg.algorithm.name == "ppo"


class MegatronTrainWorker:
    """Built on every rank of the training world (torchrun env vars already set)."""

    def __init__(self, cfg: MegaRLConfig, total_optimizer_steps: int, critic_optimizer_steps: int | None = None):
        from megarl.distributed.init import init_distributed
        from megarl.models.builder import build_megatron_model
        from megarl.models.engine import EngineOptions, MegatronEngine

        self.cfg = cfg
        layout = parallel_layout(cfg)
        init_distributed(layout, seed=cfg.trainer.seed)
        self.rank = dist.get_rank()
        dtype = DTYPES[cfg.model.dtype]
        overrides = {"moe_router_dtype": cfg.actor.router_dtype} if cfg.actor.router_dtype else {}
        actor = build_megatron_model(cfg.model.path, layout, trainable=True, dtype=dtype, config_overrides=overrides)
        self.actor = MegatronEngine(actor, EngineOptions(
            micro_batches=micro_batch_options(cfg), optimizer=optimizer_options(cfg, total_optimizer_steps)))
        self.ref = None
        if needs_reference(cfg):
            ref = build_megatron_model(cfg.model.ref_path or cfg.model.path, layout, trainable=False, dtype=dtype,
                                       config_overrides=overrides)
            self.ref = MegatronEngine(ref, EngineOptions(micro_batches=micro_batch_options(cfg, True), optimizer=None))
        self.critic = None
        if uses_critic(cfg):
            critic = build_megatron_model(cfg.critic.path, layout, trainable=True, dtype=dtype,
                                          config_overrides=overrides, value_head=True)
            steps = critic_optimizer_steps or total_optimizer_steps
            self.critic = MegatronEngine(critic, EngineOptions(
                micro_batches=micro_batch_options(cfg, critic=True),
                optimizer=optimizer_options(cfg, steps, cfg.critic.optimizer)))
        self.loss_options = policy_loss_options(cfg)
        self.pusher = None

    # ------------------------------------------------------------------ log-probs
    def compute_logprobs(self, batch, model: str = "actor", mini_batches=None):
        """Token-aligned log-probs `[B, S]` at the rollout temperature (rank 0 returns them).

        With `mini_batches` (lists of sample indices) the pass runs mini-batch by mini-batch with the
        TRAINING micro-batch plan, so the first update's forward sees bit-identical micro-batches and
        its ppo_kl is exactly 0 on-policy.
        """
        engine = self.actor if model == "actor" else self.ref
        temperature = self.cfg.rollout.temperature or 1.0
        if mini_batches is None:
            out, _ = engine.forward_logprobs(batch, temperature=temperature,
                                             micro_batches=micro_batch_options(self.cfg, for_log_prob=True))
        else:
            out = torch.zeros_like(batch.input_ids, dtype=torch.float32)
            for indices in mini_batches:
                sub = batch.select(indices)
                lp, _ = engine.forward_logprobs(sub, temperature=temperature, micro_batches=micro_batch_options(self.cfg))
                out[indices, : lp.size(1)] = lp
        return out if self.rank == 0 else None

    def compute_values(self, batch, mini_batches=None):
        """The critic's token-aligned values `[B, S]` (rank 0 returns them); with `mini_batches`, per
        mini-batch with the critic's training micro-batch plan (the first value update then starts
        from exactly these values, so its value clipping is inactive on-policy)."""
        if mini_batches is None:
            out = self.critic.forward_values(batch, micro_batches=micro_batch_options(self.cfg, True, critic=True))
        else:
            out = torch.zeros_like(batch.input_ids, dtype=torch.float32)
            for indices in mini_batches:
                values = self.critic.forward_values(batch.select(indices))
                out[indices, : values.size(1)] = values
        return out if self.rank == 0 else None

    def update_critic(self, batch, mini_batches: list[list[int]]) -> list[dict]:
        """`critic.ppo_epochs` passes of clipped value-loss steps over the mini-batches (fields
        `values` = old values, `returns`, `loss_mask`); metrics per step."""
        from megarl.algorithms import compute_loss_normalisers, value_loss_fn

        c = self.cfg.critic
        results = []
        for _epoch in range(c.ppo_epochs):
            for indices in mini_batches:
                sub = batch.select(indices)
                normalisers = compute_loss_normalisers(sub.fields["loss_mask"],
                                                       max_response_length=self.cfg.rollout.max_new_tokens)
                loss_fn = value_loss_fn(normalisers, cliprange_value=c.cliprange_value, loss_agg_mode=c.loss_agg_mode,
                                        fields=("values", "returns", "loss_mask"))
                step = self.critic.train_step(sub, loss_fn)
                metrics = {f"critic/{k}": v for k, v in step.metrics.items()}
                metrics.update({"critic/grad_norm": step.grad_norm, "critic/lr": step.lr})
                results.append(metrics)
        return results if self.rank == 0 else None

    # ------------------------------------------------------------------ update
    def update(self, batch, mini_batches: list[list[int]]) -> list[dict]:
        """`ppo_epochs` passes over the mini-batches, one optimizer step each; metrics per step."""
        from megarl.algorithms import apply_rollout_rejection, compute_loss_normalisers, policy_loss_fn

        options = self.loss_options
        results = []
        for _epoch in range(self.cfg.actor.ppo_epochs):
            for indices in mini_batches:
                sub = batch.select(indices)
                mask = sub.fields["loss_mask"]
                extra = {}
                if options.rollout_correction.rejects:
                    mask, extra = apply_rollout_rejection(
                        sub.fields["old_logprobs"], sub.fields["rollout_logprobs"], mask, options.rollout_correction)
                    sub = sub.with_fields(loss_mask=mask)
                normalisers = compute_loss_normalisers(mask, max_response_length=self.cfg.rollout.max_new_tokens)
                step = self.actor.train_step(
                    sub, policy_loss_fn(options, normalisers), temperature=self.cfg.rollout.temperature or 1.0,
                    with_entropy=True,
                )
                metrics = {f"actor/{k}": v for k, v in step.metrics.items()}
                metrics.update({k: float(v) for k, v in extra.items()})
                metrics.update({"actor/loss": step.loss, "actor/grad_norm": step.grad_norm, "actor/lr": step.lr})
                results.append(metrics)
        return results if self.rank == 0 else None

    # ------------------------------------------------------------------ weights
    def attach_rollout(self, engines, transport: str, bucket_mb: float, verify: str = "none") -> None:
        """Rank 0 sends to `engines`; the other ranks only take part in the export's collectives
        (under torchrun they hold no Ray handles and get `engines=None`)."""
        from megarl.rollout.weight_sync.pusher import WeightPusher, WeightPushOptions

        if self.rank == 0:
            self.pusher = WeightPusher(engines, WeightPushOptions(transport=transport, bucket_mb=bucket_mb, verify=verify))

    def push_weights(self) -> dict | None:
        if self.rank != 0:
            for _ in self.actor.export_hf_weights():  # collectives: every rank walks the export
                pass
            return None
        stats = self.pusher.push(self.actor.export_hf_weights(), is_sender=True)
        return {"weight_push/seconds": stats.seconds, "weight_push/gbytes": stats.bytes / 1e9,
                "weight_push/gb_per_s": stats.gb_per_s, "weight_push/buckets": stats.buckets}

    def export_weights(self) -> dict | None:
        """All HF-named weights as one dict on rank 0 (tests, small models)."""
        weights = {name: tensor.clone() for name, tensor in self.actor.export_hf_weights()}
        return weights if self.rank == 0 else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint_root: str) -> None:
        from megarl.checkpoint.megatron_state import save_megatron_state, save_rng_state
        from megarl.checkpoint.store import MEGATRON_SUBDIR

        save_megatron_state(self.actor, os.path.join(checkpoint_root, MEGATRON_SUBDIR))
        if self.critic is not None:
            critic_dir = os.path.join(checkpoint_root, CRITIC_SUBDIR)
            if self.rank == 0:
                os.makedirs(critic_dir, exist_ok=True)
            dist.barrier()
            save_megatron_state(self.critic, critic_dir)
        save_rng_state(checkpoint_root, self.rank)
        dist.barrier()

    def load_checkpoint(self, checkpoint_root: str, load_optimizer: bool = True) -> None:
        from megarl.checkpoint.megatron_state import load_megatron_state, load_rng_state
        from megarl.checkpoint.store import MEGATRON_SUBDIR

        load_megatron_state(self.actor, os.path.join(checkpoint_root, MEGATRON_SUBDIR), load_optimizer=load_optimizer)
        critic_dir = os.path.join(checkpoint_root, CRITIC_SUBDIR)
        if self.critic is not None and os.path.isdir(critic_dir):
            load_megatron_state(self.critic, critic_dir, load_optimizer=load_optimizer)
        elif self.critic is not None and load_optimizer:
            from megarl.checkpoint.store import CheckpointError

            raise CheckpointError(f"checkpoint {checkpoint_root} has no critic state ({CRITIC_SUBDIR}/) to resume PPO "
                                  "from; it was written by a run without a critic")
        if load_optimizer:
            load_rng_state(checkpoint_root, self.rank)
        dist.barrier()
