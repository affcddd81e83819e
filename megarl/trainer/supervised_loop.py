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

import dataclasses
import os


from megarl.checkpoint.store import CheckpointStore, read_trainer_state, resolve_resume
from megarl.config.schema import MegaRLConfig
from megarl.trainer import components
from megarl.trainer.metrics import MetricsLogger, PhaseTimer
from megarl.trainer.sample_stream import SampleStream
from megarl.trainer.supervised_worker import SupervisedWorker


def data_parallel_size(cfg: MegaRLConfig) -> int:
    p = cfg.parallel
    return cfg.world_size // (p.tp * p.pp * p.cp)


class SupervisedTrainer:
    """Subclasses set `worker_step` / `worker_eval` (SupervisedWorker method names) and implement
    `build_dataset(files)`, `make_batch(samples)` and `summarize_validation(results)`."""

    worker_step: str
    worker_eval: str
    max_trained_count: int | None = None

    def __init__(self, cfg: MegaRLConfig):
        from megarl.trainer.worker_group import RayWorkerGroup, TorchrunWorkerGroup, launched_by_torchrun

        self.cfg = cfg
        self.out_dir = os.path.abspath(cfg.trainer.output_dir)
        self.store = CheckpointStore(os.path.join(self.out_dir, "checkpoints"), keep_last=cfg.trainer.keep_last_k)
        resume_from = resolve_resume(cfg.trainer.resume, self.store)  # a bad path fails before any rank starts

        self.tokenizer = components.load_tokenizer(cfg)
        self.train_set = self.build_dataset(cfg.data.train_files)
        self.val_set = self.build_dataset(cfg.data.val_files) if cfg.data.val_files else None
        t = cfg.trainer
        self.stream = SampleStream(
            len(self.train_set), cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
            num_epochs=None if t.total_steps else t.total_epochs, max_count=self.max_trained_count,
            min_batch_size=data_parallel_size(cfg))
        # An upper bound (a capped stream may end sooner); it also spans the LR schedule.
        self.total_steps = min(b for b in (t.total_steps, self.stream.max_batches) if b)

        device = components.device_plan(cfg)  # before Ray starts: its actors inherit the decision
        if not launched_by_torchrun():
            from megarl.utils.ray_runtime import init_ray

            init_ray()
        group_cls = TorchrunWorkerGroup if launched_by_torchrun() else RayWorkerGroup
        self.workers = group_cls(SupervisedWorker, cfg.world_size,  # no rollout: every GPU trains
                                 args=(cfg, self.total_steps),
                                 num_cpus_per_rank=device.cpus_per_rank, num_gpus_per_rank=device.gpus_per_rank)
        self.logger = MetricsLogger(os.path.join(self.out_dir, "tensorboard"), tuple(t.logger),
                                    jsonl_path=os.path.join(self.out_dir, "metrics.jsonl"))
        self.step = 0
        self.trained_batches: list[list[int]] | None = None  # set to [] to record each step's dataset indices
        if resume_from:
            self._load(resume_from)

    # ---------------------------------------------------------------------------------- subclass parts
    def build_dataset(self, files):
        raise NotImplementedError

    def make_batch(self, samples):
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
                metrics = self.workers.call_rank0(self.worker_step, batch)
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
        return self.summarize_validation(self.workers.call_rank0(self.worker_eval, batch))

    def save_hf(self, out_dir: str) -> list[str]:
        """Export the current policy as a HuggingFace folder."""
        return self.workers.call_rank0("save_hf", out_dir)

    # ---------------------------------------------------------------------------------- checkpoints
    def save(self) -> str:
        pending = self.store.begin(self.step)
        self.workers.call_all("save_checkpoint", pending.path)
        state = {"data": self.stream.state_dict(), "config": dataclasses.asdict(self.cfg)}
        return self.store.commit(pending, state)

    def _load(self, path: str) -> None:
        """A training checkpoint continues exactly (weights, optimizer, RNG, data position and
        per-sample counts); a model-only one starts a fresh optimizer and data stream from its weights."""
        state = read_trainer_state(path)
        model_only = bool(state.get("model_only"))
        self.workers.call_all("load_checkpoint", path, not model_only)
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        self.step = int(state["step"]) if not model_only else 0
        print(f"resumed from {path} at step {self.step}", flush=True)

    def _due(self, freq: int) -> bool:
        return freq > 0 and self.step % freq == 0

    def close(self) -> None:
        self.logger.close()
        self.workers.shutdown()
