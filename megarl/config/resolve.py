"""Fill the fields whose default depends on other fields (the `None` = "derive it" ones).

Runs after type checking and before `validate`, so the printed config shows every value the run uses.
"""

from __future__ import annotations

import copy
import os

from megarl.config.schema import MegaRLConfig


def rollout_gpus(cfg: MegaRLConfig) -> int:
    """GPUs the rollout engines occupy: all of them when colocated, their own share otherwise."""
    if cfg.rollout.placement == "colocated":
        return cfg.world_size
    return (cfg.rollout.num_engines or 0) * cfg.rollout.tensor_parallel_size


def train_gpus(cfg: MegaRLConfig) -> int:
    """GPUs in the Megatron training world."""
    if cfg.rollout.placement == "colocated":
        return cfg.world_size
    return cfg.world_size - rollout_gpus(cfg)


def resolve(cfg: MegaRLConfig) -> MegaRLConfig:
    """A copy of `cfg` with derived defaults filled in (never overrides a value the user set)."""
    cfg = copy.deepcopy(cfg)
    m, p, r, a = cfg.model, cfg.parallel, cfg.rollout, cfg.algorithm
    if m.path is not None:
        m.ref_path = m.ref_path or m.path
        m.tokenizer_path = m.tokenizer_path or m.path
    if p.etp is None:
        p.etp = p.tp
    if p.sequence_parallel is None:
        p.sequence_parallel = p.tp > 1
    if a.adv_estimator is None:
        a.adv_estimator = "gae" if a.name == "ppo" else "grpo"
    c = cfg.critic
    c.path = c.path or m.path
    c.ppo_epochs = c.ppo_epochs or cfg.actor.ppo_epochs
    c.ppo_mini_batch_size = c.ppo_mini_batch_size or cfg.actor.ppo_mini_batch_size
    c.micro_batch_size = c.micro_batch_size or cfg.actor.micro_batch_size
    if a.clip_ratio_low is None:
        a.clip_ratio_low = a.clip_ratio
    if a.clip_ratio_high is None:
        a.clip_ratio_high = a.clip_ratio
    if r.num_engines is None and r.placement == "colocated" and r.tensor_parallel_size > 0:
        r.num_engines = max(cfg.world_size // r.tensor_parallel_size, 0)
    if cfg.actor.log_prob_max_token_len_per_gpu is None:
        cfg.actor.log_prob_max_token_len_per_gpu = cfg.actor.max_token_len_per_gpu
    if cfg.trainer.output_dir is None:
        cfg.trainer.output_dir = os.path.join("outputs", cfg.trainer.experiment_name)
    return cfg
