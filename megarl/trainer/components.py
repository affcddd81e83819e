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

    d = cfg.data
    dataset = RLDataset(RLDatasetConfig(
        files=list(files), prompt_key=d.prompt_key, max_prompt_length=d.max_prompt_length,
        filter_overlong_prompts=d.filter_overlong_prompts, truncation=d.truncation,
    ), tokenizer)
    if dataset.num_filtered:  # once, at start (the trainer also logs it as data/*_prompts_dropped_overlong)
        print(f"warning: {', '.join(files)}: dropped {dataset.num_filtered} of {dataset.num_read} prompts longer than "
              f"max_prompt_length={d.max_prompt_length} tokens (data.filter_overlong_prompts)", file=sys.stderr)
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
    from megarl.rewards.config import RewardConfig, RewardTermConfig
    from megarl.rewards.manager import RewardManager

    r = cfg.reward
    if r.custom_function:
        terms = [RewardTermConfig(name=r.custom_function)]
    else:
        terms = [RewardTermConfig(name=name, weight=weight) for name, weight in r.terms()]
    if r.overlong_buffer.enable:
        terms.append(RewardTermConfig(name="overlong", kwargs={
            "max_response_length": cfg.rollout.max_new_tokens, "overlong_buffer_len": r.overlong_buffer.len,
            "penalty_factor": r.overlong_buffer.penalty_factor}))
    return RewardManager(RewardConfig(terms=terms, num_workers=r.num_workers, timeout_s=r.timeout_s,
                                      fallback_score=r.fallback))


def rollout_engines(cfg: MegaRLConfig, num_engines: int):
    import torch

    from megarl.rollout import EngineGroup, EngineGroupOptions, VLLMEngineConfig

    r = cfg.rollout
    cpu = not torch.cuda.is_available()
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.model.dtype]
    max_len = cfg.data.max_prompt_length + r.max_new_tokens * max(1, r.max_turns)
    engine_config = VLLMEngineConfig(
        model=cfg.model.path, tensor_parallel_size=r.tensor_parallel_size, dtype=dtype, max_model_len=max_len,
        seed=cfg.trainer.seed, logprobs_mode="processed_logprobs", enforce_eager=r.enforce_eager or cpu,
        gpu_memory_utilization=r.gpu_memory_utilization,
        enable_sleep_mode=(r.placement == "colocated" and not cpu),
        engine_kwargs={k: v for k, v in {"max_num_batched_tokens": r.max_num_batched_tokens}.items() if v},
    )
    return EngineGroup(engine_config, EngineGroupOptions(
        num_engines=num_engines, placement="disaggregated" if cpu else r.placement,
        on_engine_failure=r.on_engine_failure, max_restarts=r.max_engine_restarts,
        engine_cpus=0.5 if cpu else 1.0))


def sampling_options(cfg: MegaRLConfig, *, validation: bool = False):
    from megarl.rollout import SamplingOptions

    r = cfg.rollout
    if validation:  # greedy pass@1
        return SamplingOptions(n=1, temperature=0.0, max_tokens=r.max_new_tokens)
    return SamplingOptions(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=max(r.top_k, 0),
                           max_tokens=r.max_new_tokens)
