"""What every Megatron rank does the same way, whatever the loop (RL, SFT, DPO): build an engine from
an HF folder for the run's layout, and save / load its training state (model, optimizer, LR
schedule, this rank's RNG) into a checkpoint folder of `megarl.checkpoint.store`.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from megarl.config.schema import MegaRLConfig


def build_engine(cfg: MegaRLConfig, hf_dir: str, *, micro_batches, total_optimizer_steps: int | None = None):
    """A `MegatronEngine` for `hf_dir` at the run's layout (init_distributed already called).

    total_optimizer_steps=None builds a frozen, inference-only engine (a reference model);
    otherwise a trainable one whose LR schedule spans that many optimizer steps.
    """
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine
    from megarl.trainer.train_worker import DTYPES, optimizer_options, parallel_layout

    trainable = total_optimizer_steps is not None
    overrides = {"moe_router_dtype": cfg.actor.router_dtype} if cfg.actor.router_dtype else {}
    handle = build_megatron_model(hf_dir, parallel_layout(cfg), trainable=trainable, dtype=DTYPES[cfg.model.dtype],
                                  config_overrides=overrides)
    optimizer = optimizer_options(cfg, total_optimizer_steps) if trainable else None
    return MegatronEngine(handle, EngineOptions(micro_batches=micro_batches, optimizer=optimizer))


def save_engine_checkpoint(engine, checkpoint_root: str) -> None:
    """Collective: model + optimizer + LR schedule under `<root>/megatron`, RNG under `<root>/rng`."""
    from megarl.checkpoint.megatron_state import save_megatron_state, save_rng_state
    from megarl.checkpoint.store import MEGATRON_SUBDIR

    save_megatron_state(engine, os.path.join(checkpoint_root, MEGATRON_SUBDIR))
    save_rng_state(checkpoint_root, dist.get_rank())
    dist.barrier()


def load_engine_checkpoint(engine, checkpoint_root: str, load_optimizer: bool = True) -> None:
    """Collective: the inverse of `save_engine_checkpoint` (load_optimizer=False: weights only, e.g. a
    model-only checkpoint; the RNG then keeps its seeded state)."""
    from megarl.checkpoint.megatron_state import load_megatron_state, load_rng_state
    from megarl.checkpoint.store import MEGATRON_SUBDIR

    load_megatron_state(engine, os.path.join(checkpoint_root, MEGATRON_SUBDIR), load_optimizer=load_optimizer)
    if load_optimizer:
        load_rng_state(checkpoint_root, dist.get_rank())
    dist.barrier()
