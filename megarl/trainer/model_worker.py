"""What every Megatron rank does the same way, whatever the loop (RL, SFT, DPO): map the config onto
layout / optimizer / micro-batch options, build an engine (policy, reference or critic) from an HF
folder for the run's layout, and save / load its training state (model, optimizer, LR schedule,
this rank's RNG) into a checkpoint folder of `megarl.checkpoint.store`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megarl.config.schema import MegaRLConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parallel_layout(cfg: MegaRLConfig):
    from megarl.distributed import ParallelLayout

    return ParallelLayout.from_config(cfg.parallel)


def optimizer_options(cfg: MegaRLConfig, total_optimizer_steps: int, o=None):
    """megatron optimizer options from `o` (an OptimizerConfig; default the actor's `cfg.optimizer`)."""
    from megarl.models.optimizer import OptimizerOptions

    return OptimizerOptions.from_config(o or cfg.optimizer, total_optimizer_steps=total_optimizer_steps,
                                        bf16=cfg.model.dtype == "bf16")


def micro_batch_options(cfg: MegaRLConfig, for_log_prob: bool = False, critic: bool = False):
    """The actor's micro-batching (the critic's with `critic`: its own micro_batch_size, the actor's
    token budgets)."""
    from megarl.models.engine import MicroBatchOptions

    return MicroBatchOptions.from_config(cfg.actor, for_log_prob=for_log_prob,
                                         micro_batch_size=cfg.critic.micro_batch_size if critic else None)


def model_config_overrides(cfg: MegaRLConfig, trainable: bool = True) -> dict:
    """TransformerConfig fields set from the config: the MoE router dtype and, for a trainable
    engine, activation recomputation (parallel.recompute, megatron's names; a frozen model keeps no
    activations for a backward, so it has nothing to recompute)."""
    overrides = {"moe_router_dtype": cfg.actor.router_dtype} if cfg.actor.router_dtype else {}
    rc = cfg.parallel.recompute
    if trainable and rc.granularity is not None:
        overrides["recompute_granularity"] = rc.granularity
        if rc.granularity == "full":
            overrides.update(recompute_method=rc.method, recompute_num_layers=rc.num_layers)
    return overrides


def build_engine(cfg: MegaRLConfig, hf_dir: str, *, micro_batches, total_optimizer_steps: int | None = None,
                 optimizer=None, value_head: bool = False):
    """A `MegatronEngine` for `hf_dir` at the run's layout (init_distributed already called).

    total_optimizer_steps=None builds a frozen, inference-only engine (a reference model);
    otherwise a trainable one whose LR schedule spans that many optimizer steps, with `optimizer`
    (an OptimizerConfig; default the actor's `cfg.optimizer`). `value_head=True`: a critic.
    """
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine

    trainable = total_optimizer_steps is not None
    handle = build_megatron_model(hf_dir, parallel_layout(cfg), trainable=trainable, dtype=DTYPES[cfg.model.dtype],
                                  config_overrides=model_config_overrides(cfg, trainable), value_head=value_head)
    options = optimizer_options(cfg, total_optimizer_steps, optimizer) if trainable else None
    return MegatronEngine(handle, EngineOptions(micro_batches=micro_batches, optimizer=options))


def save_engine_checkpoint(engine, checkpoint_root: str) -> None:
    """Collective: model + optimizer + LR schedule under `<root>/megatron`, RNG under `<root>/rng`."""
    from megarl.checkpoint.megatron_state import save_megatron_state, save_rng_state
    from megarl.checkpoint.store import MEGATRON_SUBDIR

    save_megatron_state(engine, os.path.join(checkpoint_root, MEGATRON_SUBDIR))
    save_rng_state(checkpoint_root, dist.get_rank())
    dist.barrier()


def save_engine_state(engine, directory: str) -> None:
    """Collective: one more engine's model + optimizer + LR schedule in its own folder of a
    checkpoint (e.g. the PPO critic beside the actor); no RNG (the checkpoint's actor has it)."""
    from megarl.checkpoint.megatron_state import save_megatron_state

    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    save_megatron_state(engine, directory)


def load_engine_state(engine, directory: str, load_optimizer: bool = True) -> None:
    from megarl.checkpoint.megatron_state import load_megatron_state

    load_megatron_state(engine, directory, load_optimizer=load_optimizer)


def load_engine_checkpoint(engine, checkpoint_root: str, load_optimizer: bool = True) -> None:
    """Collective: the inverse of `save_engine_checkpoint` (load_optimizer=False: weights only, e.g. a
    model-only checkpoint; the RNG then keeps its seeded state)."""
    from megarl.checkpoint.megatron_state import load_megatron_state, load_rng_state
    from megarl.checkpoint.store import MEGATRON_SUBDIR

    load_megatron_state(engine, os.path.join(checkpoint_root, MEGATRON_SUBDIR), load_optimizer=load_optimizer)
    if load_optimizer:
        load_rng_state(checkpoint_root, dist.get_rank())
    dist.barrier()
