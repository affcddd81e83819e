"""The training loops. `run(config)` is what `launch/train.py` calls; `trainer.type` picks the loop:
rl (GRPO / PPO with rollouts, `rl_trainer.RLTrainer`), sft (`sft_trainer.SFTTrainer`) or dpo
(`dpo_trainer.DPOTrainer`). All three stand on `skeleton.TrainerSkeleton` (checkpoint store, the
resume rule, worker group, metrics logger, save / load, close).

Two ways to start the same loop:
- `python launch/train.py ...` (a Ray driver): the training ranks are Ray actors the driver places,
  on this machine or on the Ray cluster (Slurm recipe);
- `torchrun --nproc-per-node N launch/train.py ...`: the training ranks are torchrun's processes;
  rank 0 runs the loop (data, rollout, rewards) and the others follow its calls.
"""


import importlib
import os

TRAINERS = {
    "rl": "megarl.trainer.rl_trainer:RLTrainer",
    "sft": "megarl.trainer.sft_trainer:SFTTrainer",
    "dpo": "megarl.trainer.dpo_trainer:DPOTrainer",
}


def trainer_class(kind: str):
    module, _, name = TRAINERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def run(cfg) -> list[dict]:
    from megarl.config.validate import check_can_start
    from megarl.trainer import components
    from megarl.trainer.worker_group import follow_rank0, launched_by_torchrun

    check_can_start(cfg)  # ConfigError before any process group or actor
    # Decided (and printed by rank 0) once, before anything starts; under torchrun every rank decides
    # the same. Impossible device requests (cuda without CUDA, a CUDA transport on CPU) are ConfigErrors.
    components.device_plan(cfg, announce=os.environ.get("RANK", "0") == "0")
    if launched_by_torchrun():
        import torch.distributed as dist

        from megarl.platform.device import apply_device_compat, collective_backend

        apply_device_compat()
        if not dist.is_initialized():
            dist.init_process_group(collective_backend())
        if dist.get_rank() != 0:
            follow_rank0()
            return []
    trainer = trainer_class(cfg.trainer.type)(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
