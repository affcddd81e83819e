"""What every trainer (RL: GRPO / PPO; SFT; DPO) does the same way around its own loop:

    __init__   output folder, checkpoint store, resume resolution (a bad path fails before any
               actor starts), tokenizer, step 0
    start()    the training ranks (Ray actors, or torchrun's processes; Ray is started only for Ray
               actors), the metrics logger, then the resume checkpoint
    save()     store.begin → every rank saves → commit with the trainer's state
    load()     the resume rule below
    _due()     every `freq` steps
    close()

Resume rule, the same for every trainer. A training checkpoint continues exactly: weights,
optimizer, LR schedule, RNG, data position (and the loop's own state) and its step. A model-only
checkpoint (`trainer_state.json` has `"model_only": true`, e.g. written by `megarl-convert
hf-to-mcore`) is weights only: a fresh optimizer and LR schedule, a fresh data stream and step 0,
whatever else its trainer state holds — it starts a run, it does not continue one. (Keeping its
step would put the loop at step N while the fresh LR schedule and optimizer stand at 0.)

A subclass builds its own parts between `super().__init__(cfg)` and `self.start(...)` (datasets and
rewards first, so bad input fails before any rank starts), and says what its checkpoint state is
(`trainer_state()` / `load_trainer_state()`).
"""

from __future__ import annotations

import dataclasses
import os

from megarl.checkpoint.store import TRAINER_STATE_FILE, CheckpointError, CheckpointStore, read_trainer_state, resolve_resume
from megarl.config.schema import MegaRLConfig
from megarl.trainer import components
from megarl.trainer.metrics import MetricsLogger


class TrainerSkeleton:
    # trainer_state() entries a training checkpoint of this trainer must hold to be resumed
    trainer_state_keys: tuple[str, ...] = ()

    def __init__(self, cfg: MegaRLConfig):
        self.cfg = cfg
        self.out_dir = os.path.abspath(cfg.trainer.output_dir)
        self.store = CheckpointStore(os.path.join(self.out_dir, "checkpoints"), keep_last=cfg.trainer.keep_last_k)
        self.resumed_from = resolve_resume(cfg.trainer.resume, self.store)  # fails before any actor starts
        if self.resumed_from:
            self._check_resume_state(self.resumed_from)
        # Decided before Ray starts (its actors inherit it); printed once per run.
        self.device = components.device_plan(cfg)
        self.tokenizer = components.load_tokenizer(cfg)
        self.step = 0
        self.workers = None
        self.logger = None

    # ---------------------------------------------------------------------------------- start
    def start(self, worker_cls, world_size: int, args=()) -> None:
        """The training ranks (`worker_cls(*args)` on each), the metrics logger, then the resume
        checkpoint's state. Call it once the trainer's own parts are built."""
        from megarl.trainer.worker_group import RayWorkerGroup, TorchrunWorkerGroup, launched_by_torchrun

        if launched_by_torchrun():  # torchrun's processes are the ranks: no Ray needed for them
            group_cls = TorchrunWorkerGroup
        else:
            from megarl.utils.ray_runtime import init_ray

            init_ray()
            group_cls = RayWorkerGroup
        self.workers = group_cls(worker_cls, world_size, args=args,
                                 num_cpus_per_rank=self.device.cpus_per_rank,
                                 num_gpus_per_rank=self.device.gpus_per_rank)
        self.logger = MetricsLogger(os.path.join(self.out_dir, "tensorboard"), tuple(self.cfg.trainer.logger),
                                    jsonl_path=os.path.join(self.out_dir, "metrics.jsonl"))
        if self.resumed_from:
            self.load(self.resumed_from)

    # ---------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        """The loop's own state saved beside the workers' (e.g. the data position)."""
        return {}

    def load_trainer_state(self, state: dict) -> None:
        """Restore what `trainer_state()` saved (training checkpoints only)."""

    def _check_resume_state(self, path: str) -> None:
        """Before any rank starts: a training checkpoint must hold this trainer's state."""
        state = read_trainer_state(path)
        missing = [k for k in self.trainer_state_keys if k not in state]
        if not state.get("model_only") and missing:
            raise CheckpointError(
                f"checkpoint {path} has no {', '.join(map(repr, missing))} in {TRAINER_STATE_FILE}, which a "
                f"{self.cfg.trainer.type} run needs to continue (it was written by another kind of run); start "
                "from a model-only checkpoint (megarl-convert hf-to-mcore) or set trainer.resume=disable")

    def save(self) -> str:
        pending = self.store.begin(self.step)
        self.workers.all.save_checkpoint(pending.path)
        return self.store.commit(pending, {**self.trainer_state(), "config": dataclasses.asdict(self.cfg)})

    def load(self, path: str) -> None:
        """The resume rule of the module docstring."""
        state = read_trainer_state(path)
        model_only = bool(state.get("model_only"))
        self.workers.all.load_checkpoint(path, not model_only)  # load_optimizer: not for weights only
        if model_only:
            self.step = 0
        else:
            self.load_trainer_state(state)
            self.step = int(state["step"])
        print(f"resumed from {path} ({'model only' if model_only else 'training state'}) at step {self.step}",
              flush=True)

    def _due(self, freq: int) -> bool:
        return freq > 0 and self.step % freq == 0

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.workers is not None:
            self.workers.shutdown()
