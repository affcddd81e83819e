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

    p = cfg.parallel
    return ParallelLayout(
        tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, etp=p.etp, cp=p.cp, sequence_parallel=p.sequence_parallel,
        num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage,
    )


def optimizer_options(cfg: MegaRLConfig, total_optimizer_steps: int, o=None):
    """megatron optimizer options from `o` (an OptimizerConfig; default the actor's `cfg.optimizer`)."""
    from megarl.models.optimizer import OptimizerOptions

    o = o or cfg.optimizer
    decay_steps = o.lr_decay_steps or max(total_optimizer_steps, o.lr_warmup_steps + 1)
    return OptimizerOptions(
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps, clip_grad=o.clip_grad, lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=o.lr_decay_style,
        use_distributed_optimizer=o.use_distributed_optimizer, bf16=cfg.model.dtype == "bf16",
        optimizer_cpu_offload=o.optimizer_cpu_offload, optimizer_offload_fraction=o.optimizer_offload_fraction,
        overlap_cpu_optimizer_d2h_h2d=o.overlap_cpu_optimizer_d2h_h2d,
        use_precision_aware_optimizer=o.use_precision_aware_optimizer,
    )


def micro_batch_options(cfg: MegaRLConfig, for_log_prob: bool = False, critic: bool = False):
    """The actor's micro-batching (the critic's with `critic`: its own micro_batch_size, the actor's
    token budgets)."""
    from megarl.models.engine import MicroBatchOptions

    a = cfg.actor
    if a.use_dynamic_bsz:
        budget = a.log_prob_max_token_len_per_gpu if for_log_prob else a.max_token_len_per_gpu
        return MicroBatchOptions(max_tokens_per_gpu=budget)
    return MicroBatchOptions(micro_batch_size=cfg.critic.micro_batch_size if critic else a.micro_batch_size)


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
    overrides = {"moe_router_dtype": cfg.actor.router_dtype} if cfg.actor.router_dtype else {}
    handle = build_megatron_model(hf_dir, parallel_layout(cfg), trainable=trainable, dtype=DTYPES[cfg.model.dtype],
                                  config_overrides=overrides, value_head=value_head)
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
