"""RL algorithm core: advantage estimators, policy/value/KL losses, global-batch loss aggregation,
rollout/train mismatch correction, SFT and DPO losses. Pure torch: no megatron imports, so the
Megatron trainer and the unit tests use the same code.

Where things are:
  aggregation.py         loss_agg_mode registry, LossNormalisers, compute_loss_normalisers
  advantages.py          @register_advantage estimators (grpo, rloo, reinforce_plus_plus[_baseline],
                         gae), compute_advantages, filter_equal_reward_groups (DAPO)
  policy_losses.py       @register_policy_loss (ppo/vanilla with clip-higher and dual clip, gspo),
                         LossNeeds, prepare_policy_loss_inputs (mini-batch-level loss inputs)
  trust_region_losses.py cispo, sapo, geo_mean/gmpo, dppo_tv, dppo_kl
  covariance_losses.py   clip_cov, kl_cov (+ their mini-batch token selection)
  reinforce_losses.py    reinforce/gpg, dro, bypass_mode
  group_advantages.py    remax, opo, gpg, grpo_passk estimators
  token_baseline.py      optimal_token_baseline, tir_optimal_token_baseline estimators
  kl.py                  KL estimators (k1, abs, k2, k3, straight-through k1+/abs+/k3+), KL reward penalty
  rollout_correction.py  truncated IS, rejection masking, mismatch metrics
  loss.py                PolicyLossOptions, compute_policy_loss (the trainer's entry), compute_value_loss
  preference.py          compute_sft_loss, compute_dpo_loss (sigmoid, ipo)
  engine_loss.py         policy_loss_fn / sft_loss_fn / value_loss_fn: the engine's loss_fn(logprobs, entropy, mb)
"""

from megarl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageOptions,
    GroupFilterResult,
    compute_advantages,
    filter_equal_reward_groups,
    outcome_token_rewards,
    register_advantage,
    sequence_scores,
)
from megarl.algorithms.aggregation import (
    LOSS_AGG_MODES,
    LossNormalisers,
    aggregate_loss,
    compute_loss_normalisers,
    masked_mean,
    masked_whiten,
)
from megarl.algorithms.engine_loss import PolicyLossFields, policy_loss_fn, sft_loss_fn, value_loss_fn
from megarl.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLRewardOptions,
    apply_kl_penalty,
    kl_divergence,
    register_kl_estimator,
)
from megarl.algorithms.loss import PolicyLossOptions, compute_policy_loss, compute_value_loss
from megarl.algorithms.policy_losses import (
    POLICY_LOSSES,
    LossNeeds,
    PolicyLossTerms,
    declare_loss_needs,
    policy_loss_needs,
    prepare_policy_loss_inputs,
    register_policy_loss,
)
# registration of the further losses and estimators (import for the side effect)
from megarl.algorithms import covariance_losses, reinforce_losses, trust_region_losses  # noqa: E402,F401
from megarl.algorithms import group_advantages, token_baseline  # noqa: E402,F401
from megarl.algorithms.preference import DPO_LOSSES, DPOOptions, compute_dpo_loss, compute_sft_loss, sequence_log_prob
from megarl.utils.registry import Registry, UnknownNameError
from megarl.algorithms.rollout_correction import (
    RolloutCorrectionOptions,
    apply_rollout_rejection,
    mismatch_metrics,
    truncated_is_weights,
)

__all__ = [name for name in dir() if not name.startswith("_")]
