"""Supervised fine-tuning on chat conversations (`trainer.type: sft`): cross-entropy on the
assistant's tokens only (every assistant turn of a multi-turn conversation, end-of-turn marker
included), sequences packed into token-budget micro-batches with `actor.use_dynamic_bsz`.

Logged per step: train/loss (the `sft.loss_agg_mode` aggregate), train/nll_token_mean, train/grad_norm,
train/lr, train/tokens, timing_s/*; val/loss (token-mean NLL over data.val_files, nats) every
trainer.test_freq steps and at the end.
"""

from __future__ import annotations

from megarl.config.schema import MegaRLConfig
from megarl.trainer.supervised_loop import SupervisedTrainer


class SFTTrainer(SupervisedTrainer):
    def __init__(self, cfg: MegaRLConfig):
        self.max_trained_count = cfg.sft.max_trained_count
        super().__init__(cfg)

    def build_dataset(self, files):
        from megarl.data import SFTDataset, SFTDatasetConfig

        return SFTDataset(SFTDatasetConfig.from_config(self.cfg.sft, self.cfg.data, files), self.tokenizer)

    def make_batch(self, samples):
        return sft_batch(samples)

    def worker_step(self, batch) -> dict:
        return self.workers.rank0.sft_step(batch)

    def worker_eval(self, batch) -> dict:
        return self.workers.rank0.sft_eval(batch)

    def summarize_validation(self, result: dict) -> dict:
        return {"val/loss": result["nll_sum"] / max(result["tokens"], 1.0), "val/tokens": result["tokens"]}


def sft_batch(samples):
    """`SFTSample`s -> a `SequenceBatch` `[conversations, S]` with their assistant-token loss_mask."""
    from megarl.models.batch import SequenceBatch

    return SequenceBatch.from_sequences([s.input_ids for s in samples], loss_mask=[s.loss_mask for s in samples])
