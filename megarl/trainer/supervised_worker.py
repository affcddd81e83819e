"""One Megatron rank of a supervised run: SFT (the policy alone) or DPO (the policy and a frozen
reference). The driver (`supervised_loop.SupervisedTrainer`) calls every rank in lock step with the
same global batch; rank 0 returns the results, the other ranks None.

Batches are `SequenceBatch`es with a per-token `loss_mask` field (1 on the tokens the loss reads:
assistant tokens for SFT, response tokens for DPO). DPO batches hold pairs as consecutive rows
(chosen_0, rejected_0, chosen_1, rejected_1, ...), and every micro-batch plan keeps a pair together
(`group_size=2`), so inside a micro-batch rows 0::2 are chosen and 1::2 rejected.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megarl.config.schema import MegaRLConfig
from megarl.trainer.model_worker import (
    build_engine,
    load_engine_checkpoint,
    micro_batch_options,
    parallel_layout,
    save_engine_checkpoint,
)


def dpo_loss_fn(options, num_pairs: int):
    """A `loss_fn` for `engine.train_step`: the DPO loss of a micro-batch of interleaved pairs
    against the global pair count. Reads fields loss_mask and ref_logprobs `[2 * pairs, S]`."""
    from megarl.algorithms.preference import compute_dpo_loss

    def loss_fn(logprobs, entropy, micro_batch):
        mask, ref = micro_batch.fields["loss_mask"], micro_batch.fields["ref_logprobs"]
        return compute_dpo_loss(logprobs[0::2], mask[0::2], logprobs[1::2], mask[1::2], ref[0::2], ref[1::2],
                                options, num_pairs=num_pairs)

    return loss_fn


class SupervisedWorker:
    """Built on every rank of the training world (torchrun env vars already set)."""

    def __init__(self, cfg: MegaRLConfig, total_optimizer_steps: int):
        from megarl.algorithms.preference import DPOOptions
        from megarl.distributed.init import init_distributed

        self.cfg = cfg
        init_distributed(parallel_layout(cfg), seed=cfg.trainer.seed)
        self.rank = dist.get_rank()
        self.is_dpo = cfg.trainer.type == "dpo"
        # DPO: a pair never straddles two micro-batches (the loss compares its two sequences).
        self.micro_batches = dataclasses.replace(micro_batch_options(cfg), group_size=2 if self.is_dpo else 1)
        self.actor = build_engine(cfg, cfg.model.path, micro_batches=self.micro_batches,
                                  total_optimizer_steps=total_optimizer_steps)
        self.ref = None
        if self.is_dpo:
            self.ref = build_engine(cfg, cfg.model.ref_path or cfg.model.path, micro_batches=self.micro_batches)
            d = cfg.dpo
            self.dpo_options = DPOOptions.from_config(d)

    def _rank0(self, value):
        return value if self.rank == 0 else None

    # ------------------------------------------------------------------ SFT
    def sft_step(self, batch) -> dict | None:
        """One optimizer step of token-level cross-entropy on the batch's loss_mask tokens."""
        from megarl.algorithms import compute_loss_normalisers
        from megarl.algorithms.engine_loss import sft_loss_fn

        mask = batch.fields["loss_mask"]
        # Every rank holds the whole global batch: its mask gives the global normalisers directly.
        # (seq-mean-token-sum-norm divides by the configured length, never by this batch's padding.)
        normalisers = compute_loss_normalisers(mask, max_response_length=self.cfg.sft.max_length)
        step = self.actor.train_step(batch, sft_loss_fn(normalisers, loss_agg_mode=self.cfg.sft.loss_agg_mode))
        return self._rank0({
            "train/loss": step.loss, "train/nll_token_mean": step.metrics["nll_token_mean"],
            "train/grad_norm": step.grad_norm, "train/lr": step.lr, "train/tokens": float(batch.num_tokens),
            "train/loss_tokens": float(mask.sum()), "train/micro_batches": float(step.num_micro_batches),
        })

    def sft_eval(self, batch) -> dict | None:
        """Summed NLL (nats) and count of the batch's loss_mask tokens (no update)."""
        logprobs, _ = self.actor.forward_logprobs(batch, micro_batches=micro_batch_options(self.cfg, for_log_prob=True))
        mask = batch.fields["loss_mask"]
        return self._rank0({"nll_sum": float(-(logprobs * mask).sum()), "tokens": float(mask.sum())})

    # ------------------------------------------------------------------ DPO
    def reference_logprobs(self, batch) -> torch.Tensor:
        """`[2 * pairs, S]` reference log-probs with the TRAINING micro-batch plan: with policy ==
        reference the policy's training forward then sees bit-identical micro-batches."""
        logprobs, _ = self.ref.forward_logprobs(batch, micro_batches=self.micro_batches)
        return logprobs

    def dpo_step(self, batch) -> dict | None:
        """One optimizer step of the DPO loss over the batch's pairs (reference computed here, once)."""
        batch = batch.with_fields(ref_logprobs=self.reference_logprobs(batch))
        num_pairs = len(batch) // 2
        step = self.actor.train_step(batch, dpo_loss_fn(self.dpo_options, num_pairs))
        metrics = {f"train/{k}": v for k, v in step.metrics.items()}
        metrics.update({"train/loss": step.loss, "train/grad_norm": step.grad_norm, "train/lr": step.lr,
                        "train/tokens": float(batch.num_tokens), "train/pairs": float(num_pairs),
                        "train/micro_batches": float(step.num_micro_batches)})
        return self._rank0(metrics)

    def dpo_eval(self, batch) -> dict | None:
        """DPO loss and reward metrics of the batch's pairs under the current policy (no update)."""
        policy, _ = self.actor.forward_logprobs(batch, micro_batches=self.micro_batches)
        batch = batch.with_fields(ref_logprobs=self.reference_logprobs(batch))
        loss, metrics = dpo_loss_fn(self.dpo_options, len(batch) // 2)(policy, None, batch)
        return self._rank0({"loss": float(loss), **{k: float(v) for k, v in metrics.items()}})

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self, checkpoint_root: str) -> None:
        save_engine_checkpoint(self.actor, checkpoint_root)

    def load_checkpoint(self, checkpoint_root: str, load_optimizer: bool = True) -> None:
        load_engine_checkpoint(self.actor, checkpoint_root, load_optimizer)

    def export_weights(self) -> dict | None:
        """All HF-named weights as one dict on rank 0 (tests, small models)."""
        weights = {name: tensor.clone() for name, tensor in self.actor.export_hf_weights()}
        return self._rank0(weights)

    def save_hf(self, out_dir: str) -> list[str] | None:
        """The trained policy as a HuggingFace folder (collective; rank 0 writes)."""
        from megarl.models.export import save_hf_checkpoint

        return self._rank0(save_hf_checkpoint(self.actor.handle, out_dir))
