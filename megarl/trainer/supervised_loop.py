"""The loop SFT and DPO share, one optimizer step at a time:

    next batch of samples → sequences (+ loss mask) → worker step on every rank → metrics
        → checkpoint (every save_freq and at the end) → validation (every test_freq and at the end)

The run ends after trainer.total_steps (or total_epochs passes), or earlier when every sample
reached sft.max_trained_count.

The driver (this process) holds the data and the loop; the Megatron ranks (`SupervisedWorker`) are
Ray actors, or torchrun's processes following rank 0. A subclass says how samples become a batch,
which worker step trains on it and how validation is summarised.
"""

from __future__ import annotations

from megarl.config.schema import MegaRLConfig
from megarl.trainer.metrics import PhaseTimer
from megarl.trainer.sample_stream import SampleStream
from megarl.trainer.skeleton import TrainerSkeleton
from megarl.trainer.supervised_worker import SupervisedWorker


def data_parallel_size(cfg: MegaRLConfig) -> int:
    p = cfg.parallel
    return cfg.world_size // (p.tp * p.pp * p.cp)


class SupervisedTrainer(TrainerSkeleton):
    """Subclasses implement `build_dataset(files)`, `make_batch(samples)`, `worker_step(batch)` /
    `worker_eval(batch)` (which SupervisedWorker method trains / evaluates) and
    `summarize_validation(result)`."""

    max_trained_count: int | None = None
    trainer_state_keys = ("data",)

    def __init__(self, cfg: MegaRLConfig):
        super().__init__(cfg)  # store, resume resolution (a bad path fails before any rank starts), tokenizer
        self.train_set = self.build_dataset(cfg.data.train_files)
        self.val_set = self.build_dataset(cfg.data.val_files) if cfg.data.val_files else None
        t = cfg.trainer
        self.stream = SampleStream(
            len(self.train_set), cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
            num_epochs=None if t.total_steps else t.total_epochs, max_count=self.max_trained_count,
            min_batch_size=data_parallel_size(cfg))
        # An upper bound (a capped stream may end sooner); it also spans the LR schedule.
        self.total_steps = min(b for b in (t.total_steps, self.stream.max_batches) if b)
        self.trained_batches: list[list[int]] | None = None  # set to [] to record each step's dataset indices
        self.start(SupervisedWorker, cfg.world_size, args=(cfg, self.total_steps))  # no rollout: every GPU trains

    # ---------------------------------------------------------------------------------- subclass parts
    def build_dataset(self, files):
        raise NotImplementedError

    def make_batch(self, samples):
        raise NotImplementedError

    def worker_step(self, batch) -> dict:
        raise NotImplementedError

    def worker_eval(self, batch) -> dict:
        raise NotImplementedError

    def summarize_validation(self, result: dict) -> dict:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        history = []
        while self.step < self.total_steps:
            timer = PhaseTimer()
            with timer.phase("data"):
                indices = self.stream.next_batch()
                if indices is None:
                    break  # every sample reached max_trained_count (or the epochs are done)
                batch = self.make_batch([self.train_set[i] for i in indices])
            with timer.phase("update"):
                metrics = self.worker_step(batch)
            if self.trained_batches is not None:
                self.trained_batches.append(indices)
            self.step += 1
            last = self.step >= self.total_steps or self._stream_ended()
            if self._due(self.cfg.trainer.save_freq) or (last and self.cfg.trainer.save_freq != 0):
                with timer.phase("save"):
                    self.save()
            test_freq = self.cfg.trainer.test_freq
            if self.val_set is not None and test_freq > 0 and (self._due(test_freq) or last):
                with timer.phase("validate"):
                    metrics.update(self.validate())
            metrics.update(timer.metrics())
            metrics["train/epoch"] = float(self.stream.epoch)
            metrics["perf/tokens_per_s"] = metrics["train/tokens"] / max(metrics["timing_s/update"], 1e-9)
            self.logger.log(self.step, metrics)
            history.append(metrics)
        return history

    def _stream_ended(self) -> bool:
        """True when the next batch would be None (checked on a copy: the stream itself is untouched)."""
        probe = SampleStream(self.stream.num_samples, self.stream.batch_size, seed=self.stream.seed,
                             shuffle=self.stream.shuffle, num_epochs=self.stream.num_epochs,
                             max_count=self.stream.max_count, min_batch_size=self.stream.min_batch_size)
        probe.load_state_dict(self.stream.state_dict())
        return probe.next_batch() is None

    def validate(self) -> dict:
        """The validation set in one pass (the worker micro-batches it)."""
        batch = self.make_batch([self.val_set[i] for i in range(len(self.val_set))])
        return self.summarize_validation(self.worker_eval(batch))

    def save_hf(self, out_dir: str) -> list[str]:
        """Export the current policy as a HuggingFace folder."""
        return self.workers.rank0.save_hf(out_dir)

    # ---------------------------------------------------------------------------------- checkpoints
    # save / load / the resume rule: TrainerSkeleton. (A model-only checkpoint starts at step 0.)
    def trainer_state(self) -> dict:
        return {"data": self.stream.state_dict()}  # position and per-sample counts

    def load_trainer_state(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])
