"""Rollout: vLLM engines as Ray actors, weight push from the trainer, multi-turn scheduling.

Public API (what the trainer calls):
    init_ray(num_cpus=None)                                   # once per driver
    group = EngineGroup(VLLMEngineConfig(model=hf_dir, ...), EngineGroupOptions(num_engines=N))
    results = group.generate(requests, SamplingOptions(n=8, ...))      # results[i][j]: SampleResult
    trajectories = run_multi_turn(group, requests, sampling, scheduler)  # multi-turn episodes
    WeightPusher(group.engines, WeightPushOptions(...)).push(export_hf_weights(handle), is_sender=rank == 0)
"""

from megarl.rollout.engine_group import EngineDiedError, EngineGroup, EngineGroupOptions, EngineTimeoutError, engine_handles
from megarl.rollout.multi_turn import (
    ContinueScheduler,
    MultiTurnScheduler,
    NewTurnScheduler,
    Trajectory,
    load_scheduler,
    register_scheduler,
    run_multi_turn,
)
from megarl.rollout.placement import RolloutPlacement, init_ray
from megarl.rollout.types import EngineHealth, RolloutRequest, SampleResult, SamplingOptions
from megarl.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

__all__ = [
    "ContinueScheduler",
    "MultiTurnScheduler",
    "NewTurnScheduler",
    "Trajectory",
    "load_scheduler",
    "register_scheduler",
    "run_multi_turn",
    "EngineDiedError",
    "EngineGroup",
    "EngineGroupOptions",
    "EngineHealth",
    "EngineTimeoutError",
    "RolloutPlacement",
    "RolloutRequest",
    "SampleResult",
    "SamplingOptions",
    "VLLMEngine",
    "VLLMEngineConfig",
    "engine_handles",
    "init_ray",
]
