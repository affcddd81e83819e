"""Imports every built-in reward module, which registers them."""

from megarl.rewards import arith, default, format_rewards, length_rewards, math_rewards, reward_model  # noqa: F401
