"""Builds the trainer's parts from the config: tokenizer, data loaders, reward manager, rollout
engines. One place maps config fields onto the components' own option types."""

from __future__ import annotations

import sys

from megarl.config.schema import MegaRLConfig


def load_tokenizer(cfg: MegaRLConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)


def prompt_dataset(cfg: MegaRLConfig, tokenizer, files):
    from megarl.data import RLDataset, RLDatasetConfig

    dataset = RLDataset(RLDatasetConfig.from_config(cfg.data, files), tokenizer)
    if dataset.num_filtered:  # once, at start (the trainer also logs it as data/*_prompts_dropped_overlong)
        print(f"warning: {', '.join(files)}: dropped {dataset.num_filtered} of {dataset.num_read} prompts longer than "
              f"max_prompt_length={cfg.data.max_prompt_length} tokens (data.filter_overlong_prompts)", file=sys.stderr)
    return dataset


def train_loader(cfg: MegaRLConfig, dataset):
    from megarl.data import DataFormatError, PromptDataLoader

    if cfg.data.train_batch_size > len(dataset):
        dropped = getattr(dataset, "num_filtered", 0)
        raise DataFormatError(
            f"data.train_batch_size={cfg.data.train_batch_size} is larger than the training set: "
            f"{len(dataset)} prompts in {cfg.data.train_files}"
            + (f" ({dropped} more dropped as longer than data.max_prompt_length={cfg.data.max_prompt_length})"
               if dropped else "")
            + "; lower data.train_batch_size or add prompts")
    return PromptDataLoader(dataset, cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                            drop_last=True, num_epochs=None if cfg.trainer.total_steps else cfg.trainer.total_epochs)


def reward_manager(cfg: MegaRLConfig):
    from megarl.rewards.config import RewardConfig
    from megarl.rewards.manager import RewardManager

    return RewardManager(RewardConfig.from_config(cfg.reward, max_response_length=cfg.rollout.max_new_tokens))


def device_plan(cfg: MegaRLConfig, *, announce: bool = True):
    """The device layer's decisions for this run (megarl.platform.device_plan), printed once: with
    rollouts (trainer.type rl) also the placement, weight transport, sleep and eager mode it forces."""
    from megarl.config.resolve import train_gpus
    from megarl.platform.device import device_plan as plan

    r = cfg.rollout
    rollout = dict(placement=r.placement, transport=r.weight_sync.transport, enforce_eager=r.enforce_eager)
    with_rollout = cfg.trainer.type == "rl"
    return plan(cfg.trainer.device, **(rollout if with_rollout else {}),
                train_ranks=train_gpus(cfg) if with_rollout else cfg.world_size, announce=announce)


def rollout_engines(cfg: MegaRLConfig, num_engines: int, device):
    """The vLLM engine group; `device` is this run's DevicePlan (it decides placement, sleep, eager)."""
    from megarl.rollout import EngineGroup, EngineGroupOptions, VLLMEngineConfig

    return EngineGroup(VLLMEngineConfig.from_config(cfg, device),
                       EngineGroupOptions.from_config(cfg, device, num_engines=num_engines))


def weight_push_options(cfg: MegaRLConfig, device):
    from megarl.rollout.weight_sync.pusher import WeightPushOptions

    return WeightPushOptions.from_config(cfg.rollout.weight_sync, transport=device.weight_transport)


def sampling_options(cfg: MegaRLConfig, *, validation: bool = False):
    from megarl.rollout import SamplingOptions

    return SamplingOptions.from_config(cfg.rollout, validation=validation)
