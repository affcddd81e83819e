"""One Megatron training rank: the actor, the frozen reference and (PPO) the critic, their
log-probs / values, updates, weight pushes and checkpoints. The trainer drives a group of these
(one per rank) in lock step.
"""

from __future__ import annotations

import os
from enum import Enum

import torch
import torch.distributed as dist

from megarl.checkpoint.store import CRITIC_SUBDIR
from megarl.config.schema import MegaRLConfig
from megarl.trainer.model_worker import (
    build_engine,
    load_engine_checkpoint,
    load_engine_state,
    micro_batch_options,
    parallel_layout,
    save_engine_checkpoint,
    save_engine_state,
)


def policy_loss_options(cfg: MegaRLConfig):
    """The actor's PolicyLossOptions: every same-named field of `cfg.algorithm`, and its `tis` section."""
    from megarl.algorithms import PolicyLossOptions

    return PolicyLossOptions.from_config(cfg.algorithm)


class Model(str, Enum):
    """Which of a rank's models a call reads (`compute_logprobs(batch, Model.REF)`)."""

    ACTOR = "actor"
    REF = "ref"

    @classmethod
    def of(cls, model) -> "Model":
        try:
            return cls(model)
        except ValueError:
            raise ValueError(f"unknown model {model!r}; one of: {', '.join(m.value for m in cls)}") from None


def needs_reference(cfg: MegaRLConfig) -> bool:
    return cfg.algorithm.use_kl_loss or cfg.algorithm.use_kl_in_reward


def uses_critic(cfg: MegaRLConfig) -> bool:
    return cfg.algorithm.name == "ppo"


class MegatronTrainWorker:
    """Built on every rank of the training world (torchrun env vars already set)."""

    def __init__(self, cfg: MegaRLConfig, total_optimizer_steps: int, critic_optimizer_steps: int | None = None):
        from megarl.distributed.init import init_distributed

        self.cfg = cfg
        init_distributed(parallel_layout(cfg), seed=cfg.trainer.seed)
        self.rank = dist.get_rank()
        self.actor = build_engine(cfg, cfg.model.path, micro_batches=micro_batch_options(cfg),
                                  total_optimizer_steps=total_optimizer_steps)
        self.ref = None
        if needs_reference(cfg):
            self.ref = build_engine(cfg, cfg.model.ref_path or cfg.model.path,
                                    micro_batches=micro_batch_options(cfg, for_log_prob=True))
        self.critic = None
        if uses_critic(cfg):
            self.critic = build_engine(cfg, cfg.critic.path, micro_batches=micro_batch_options(cfg, critic=True),
                                       total_optimizer_steps=critic_optimizer_steps or total_optimizer_steps,
                                       optimizer=cfg.critic.optimizer, value_head=True)
        self.loss_options = policy_loss_options(cfg)
        self.pusher = None

    # ------------------------------------------------------------------ log-probs
    def compute_logprobs(self, batch, model: Model = Model.ACTOR, mini_batches=None):
        """Token-aligned log-probs `[B, S]` at the rollout temperature (rank 0 returns them).

        With `mini_batches` (lists of sample indices) the pass runs mini-batch by mini-batch with the
        TRAINING micro-batch plan, so the first update's forward sees bit-identical micro-batches and
        its ppo_kl is exactly 0 on-policy.
        """
        engine = self._model(model)
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

    def compute_sum_pi_squared(self, batch):
        """Token-aligned sum over the vocabulary of pi^2 `[B, S]` under the actor at the rollout
        temperature (the optimal token baseline's input; rank 0 returns it)."""
        out = self.actor.forward_sum_pi_squared(batch, temperature=self.cfg.rollout.temperature or 1.0,
                                                micro_batches=micro_batch_options(self.cfg, for_log_prob=True))
        return out if self.rank == 0 else None

    def _model(self, model: Model):
        model = Model.of(model)
        if model is Model.REF and self.ref is None:
            raise ValueError("no reference model on this run: it is built only with algorithm.use_kl_loss "
                             "or algorithm.use_kl_in_reward")
        return self.actor if model is Model.ACTOR else self.ref

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

    def set_policy_loss(self, options) -> None:
        """Use `options` (a PolicyLossOptions) for the following updates: switches the policy loss
        between runs of `fit` on the same model, optimizer and engines (loss sweeps, curricula)."""
        self.loss_options = options

    # ------------------------------------------------------------------ update
    def update(self, batch, mini_batches: list[list[int]]) -> list[dict]:
        """`ppo_epochs` passes over the mini-batches, one optimizer step each; metrics per step."""
        from megarl.algorithms import (
            apply_rollout_rejection,
            compute_loss_normalisers,
            policy_loss_fn,
            prepare_policy_loss_inputs,
        )

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
                # mini-batch-level loss inputs (Clip-Cov/KL-Cov token selection): one per mini-batch, not per micro-batch
                sub = sub.with_fields(**prepare_policy_loss_inputs(
                    options, sub.fields["old_logprobs"], sub.fields["advantages"], mask))
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
    def attach_rollout(self, engines, options) -> None:
        """Every rank calls it, with the run's `WeightPushOptions`. With the engine handles on every
        rank (Ray worker group) each pipeline stage's first rank sends its own stage's tensors; under
        torchrun only rank 0 holds Ray handles (`engines=None` elsewhere) and sends everything
        (`MegatronWeightPush`)."""
        from megarl.rollout.weight_sync.pusher import probe_sequences
        from megarl.rollout.weight_sync.staged import MegatronWeightPush

        if self.pusher is not None:
            self.pusher.close()
        self.pusher = MegatronWeightPush(self.actor.handle, engines, options)
        self.push_probe = probe_sequences(self.actor.vocab_size) if options.verify == "logprobs" else None

    @property
    def push_by_stage(self) -> bool:
        return self.pusher.by_stage

    def _logprob_probe(self):
        """verify="logprobs": Megatron's log-probs of the fixed probe (collective; rank 0 gets them)."""
        if self.push_probe is None:
            return None
        from megarl.models.batch import SequenceBatch
        from megarl.rollout.weight_sync.pusher import LogprobProbe

        logprobs, _ = self.actor.forward_logprobs(SequenceBatch.from_sequences(self.push_probe), temperature=1.0)
        if self.rank != 0:
            return None
        return LogprobProbe(self.push_probe, [logprobs[b, : len(s)].tolist() for b, s in enumerate(self.push_probe)])

    def replace_rollout_engines(self, engines: dict) -> None:
        """Every rank: send to these actors from now on ({engine index: handle}, after a restart); the
        senders' transports reconnect to the new list on the next push."""
        self.pusher.replace_engines(engines)

    def push_weights(self) -> dict | None:
        """Push the actor's weights into the engines (every rank calls it); metrics on rank 0."""
        return self.pusher.push(self._logprob_probe())

    def export_weights(self) -> dict | None:
        """All HF-named weights as one dict on rank 0 (tests, small models)."""
        weights = {name: tensor.clone() for name, tensor in self.actor.export_hf_weights()}
        return weights if self.rank == 0 else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint_root: str) -> None:
        if self.critic is not None:
            save_engine_state(self.critic, os.path.join(checkpoint_root, CRITIC_SUBDIR))
        save_engine_checkpoint(self.actor, checkpoint_root)

    def load_checkpoint(self, checkpoint_root: str, load_optimizer: bool = True) -> None:
        """`load_optimizer=False`: a model-only checkpoint (weights; a PPO critic then starts from
        critic.path unless the checkpoint holds one)."""
        critic_dir = os.path.join(checkpoint_root, CRITIC_SUBDIR)
        if self.critic is not None and os.path.isdir(critic_dir):
            load_engine_state(self.critic, critic_dir, load_optimizer=load_optimizer)
        elif self.critic is not None and load_optimizer:
            from megarl.checkpoint.store import CheckpointError

            raise CheckpointError(f"checkpoint {checkpoint_root} has no critic state ({CRITIC_SUBDIR}/) to resume PPO "
                                  "from; it was written by a run without a critic")
        load_engine_checkpoint(self.actor, checkpoint_root, load_optimizer=load_optimizer)

