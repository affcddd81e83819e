"""Typed run configuration: YAML recipe + CLI overrides → one validated `MegaRLConfig` tree."""

from megarl.config.cli import FLAG_ALIASES, build_config, parse_cli
from megarl.config.loader import ConfigError, from_dict, to_dict, to_yaml
from megarl.config.resolve import resolve, rollout_gpus, train_gpus
from megarl.config.schema import (
    ActorConfig,
    AlgorithmConfig,
    DataConfig,
    DynamicSamplingConfig,
    KLControlConfig,
    MegaRLConfig,
    ModelConfig,
    OptimizerConfig,
    OverlongBufferConfig,
    ParallelConfig,
    RecomputeConfig,
    RewardConfig,
    RolloutConfig,
    TISConfig,
    TrainerConfig,
    WeightSyncConfig,
)
from megarl.config.validate import validate


def load_config(path: str | None = None, overrides: dict | list | None = None, *,
                check_paths: bool = True) -> MegaRLConfig:
    """Load a recipe, apply overrides ({"rollout.n": 16} or [("rollout.n", "16")]), resolve, validate.

    Dict override values are typed values (like YAML); list override values are CLI text.
    """
    from megarl.config.loader import read_yaml, set_dotted

    if isinstance(overrides, dict):
        data = read_yaml(path) if path else {}
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value)
        cfg = resolve(from_dict(MegaRLConfig, data))
        validate(cfg, check_paths=check_paths)
        return cfg
    cfg, _ = build_config(path, list(overrides or []), check_paths=check_paths)
    return cfg


__all__ = [
    "ActorConfig", "AlgorithmConfig", "ConfigError", "DataConfig", "DynamicSamplingConfig", "FLAG_ALIASES",
    "KLControlConfig", "MegaRLConfig", "ModelConfig", "OptimizerConfig", "OverlongBufferConfig",
    "ParallelConfig", "RecomputeConfig", "RewardConfig", "RolloutConfig", "TISConfig", "TrainerConfig",
    "WeightSyncConfig", "build_config", "from_dict", "load_config", "parse_cli", "resolve", "rollout_gpus",
    "to_dict", "to_yaml", "train_gpus", "validate",
]
