"""The "default" reward: chosen by data_source, like verl's default_compute_score."""

from __future__ import annotations

from megarl.rewards.registry import get_reward, register_reward

# data_source → registered reward. Names are the ones verl's example preprocessing scripts write.
DATA_SOURCE_REWARDS = {
    "openai/gsm8k": "gsm8k",
    "lighteval/MATH": "math",
    "DigitalLearningGmbH/MATH-lighteval": "math",
    "HuggingFaceH4/MATH-500": "math",
    "math_dapo": "math",
    "synthetic/arith": "synthetic_arith",
}
# Prefixes of data_source names scored as math (competition sets).
MATH_PREFIXES = ("aime", "amc", "numina_", "math")


def reward_name_for(data_source: str) -> str:
    if data_source in DATA_SOURCE_REWARDS:
        return DATA_SOURCE_REWARDS[data_source]
    if data_source.lower().startswith(MATH_PREFIXES):
        return "math"
    raise ValueError(f"the default reward does not know data_source {data_source!r}; known: "
                     f"{', '.join(sorted(DATA_SOURCE_REWARDS))} and names starting with {', '.join(MATH_PREFIXES)}. "
                     "Configure a reward by name or a custom path.py:function instead.")


@register_reward("default")
def default_reward(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Dispatch to the reward registered for ``data_source`` (see DATA_SOURCE_REWARDS)."""
    return get_reward(reward_name_for(data_source)).fn(data_source, solution_str, ground_truth, extra_info, **kwargs)
