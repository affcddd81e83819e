"""Direct preference optimisation (`trainer.type: dpo`) against a frozen reference (`model.ref_path`,
by default the initial policy). Each pair becomes two sequences, prompt + chosen and prompt +
rejected, laid out consecutively so that micro-batches keep pairs whole; the loss reads the response
tokens only. The reference log-probs are computed once per batch on the training micro-batch plan.

Logged per step: train/loss (= train/dpo_loss), train/rewards/{chosen,rejected,margins,accuracies}
(beta-scaled policy-minus-reference log-probs; accuracies = fraction of pairs ranked right),
train/grad_norm, train/lr, timing_s/*; the same under val/ on data.val_files.
"""

from __future__ import annotations

from megarl.trainer.supervised_loop import SupervisedTrainer


class DPOTrainer(SupervisedTrainer):
    def build_dataset(self, files):
        from megarl.data import DPODataset, DPODatasetConfig

        return DPODataset(DPODatasetConfig.from_config(self.cfg.dpo, self.cfg.data, files), self.tokenizer)

    def make_batch(self, samples):
        return preference_batch(samples)

    def worker_step(self, batch) -> dict:
        return self.workers.rank0.dpo_step(batch)

    def worker_eval(self, batch) -> dict:
        return self.workers.rank0.dpo_eval(batch)

    def summarize_validation(self, result: dict) -> dict:
        return {f"val/{k}": v for k, v in result.items()}


def preference_batch(samples):
    """`PreferenceSample`s -> a `SequenceBatch` `[2 * pairs, S]`: rows 2i (prompt + chosen) and 2i+1
    (prompt + rejected), loss_mask 1 on the response tokens."""
    from megarl.models.batch import SequenceBatch

    sequences, masks = [], []
    for s in samples:
        for response in (s.chosen_ids, s.rejected_ids):
            sequences.append(s.prompt_ids + response)
            masks.append([0] * len(s.prompt_ids) + [1] * len(response))
    return SequenceBatch.from_sequences(sequences, loss_mask=masks)
