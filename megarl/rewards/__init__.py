"""Rewards: a registry of verl-compatible reward functions and the RewardManager the trainer calls."""

from megarl.rewards.config import RewardConfig, RewardTermConfig
from megarl.rewards.manager import RewardManager, RewardOutput, RewardRequest, normalize_result
from megarl.rewards.registry import (
    RewardEntry,
    get_reward,
    load_function,
    register_reward,
    registered_rewards,
    resolve_reward,
)

__all__ = [
    "RewardConfig",
    "RewardEntry",
    "RewardManager",
    "RewardOutput",
    "RewardRequest",
    "RewardTermConfig",
    "get_reward",
    "load_function",
    "normalize_result",
    "register_reward",
    "registered_rewards",
    "resolve_reward",
]
