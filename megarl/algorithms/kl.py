"""KL estimators between the policy and a reference, as a loss term or as a reward penalty.

Per-token estimators of KL(pi || ref) from the sampled token's log-probs (nats), `[batch, seq]`
(Schulman, "Approximating KL divergence", 2020), with delta = log pi - log ref:
  k1 ("kl")              delta                                       unbiased, can be negative
  abs                    |delta|
  k2 ("mse")             delta^2 / 2
  k3 ("low_var_kl")      exp(-delta) + delta - 1                     unbiased, >= 0, low variance
Straight-through variants (verl 0.9.1), "<name>+" for k1/kl, abs, k3/low_var_kl: the VALUE of the
base estimator with the GRADIENT of k2, delta * grad(log pi): k1's and k3's expected gradients are
not the gradient of KL(pi || ref), k2's is (Schulman 2020; Tang & Munos, arXiv:2506.09477):
  k+ = k2 - sg(k2) + sg(k)
k3 clamps as verl does: -delta to [-20, 20] before exp (no overflow), the result to [-10, 10]
(one wild token cannot dominate the loss; the gradient is zero beyond the clamp).

As a loss term (use_kl_loss): kl_loss = aggregate(k(log_prob, ref_log_prob)), added with kl_loss_coef.
As a reward penalty (use_kl_in_reward): rewards_t = scores_t - beta * k(old_log_prob, ref_log_prob)_t
on response tokens, with beta fixed or driven by the adaptive controller (Ziegler et al., 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megarl.algorithms.aggregation import masked_mean
from megarl.utils.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("kl estimator")
register_kl_estimator = KL_ESTIMATORS.register

K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


@register_kl_estimator("k1", aliases=("kl",))
def kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    return log_prob - ref_log_prob


@register_kl_estimator("abs")
def kl_abs(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    return (log_prob - ref_log_prob).abs()


@register_kl_estimator("k2", aliases=("mse",))
def kl_k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_prob - ref_log_prob).square()


@register_kl_estimator("k3", aliases=("low_var_kl",))
def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    log_ratio = (ref_log_prob - log_prob).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (log_ratio.exp() - log_ratio - 1).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


def _straight_through(base: KLEstimator) -> KLEstimator:
    def estimator(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
        k2 = kl_k2(log_prob, ref_log_prob)
        return k2 - k2.detach() + base(log_prob, ref_log_prob).detach()

    estimator.__doc__ = f"value of {base.__name__}, gradient of k2 (straight-through)"
    return estimator


kl_k1_plus = register_kl_estimator("k1+", aliases=("kl+",))(_straight_through(kl_k1))
kl_abs_plus = register_kl_estimator("abs+")(_straight_through(kl_abs))
kl_k3_plus = register_kl_estimator("k3+", aliases=("low_var_kl+",))(_straight_through(kl_k3))


def kl_divergence(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate `[batch, seq]` by the registered `estimator`."""
    return KL_ESTIMATORS.get(estimator)(log_prob, ref_log_prob)


# ----------------------------------------------------------------------------------------------------
# KL in the reward


class FixedKLController:
    """beta stays at `coef`."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon  (Ziegler et al., 2019).

    n_steps is the number of samples seen since the last update (the batch size)."""

    def __init__(self, init_coef: float, target_kl: float, horizon: int):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target_kl > 0 and horizon > 0, got {target_kl}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@dataclass
class KLRewardOptions:
    """use_kl_in_reward options (verl's algorithm.kl_ctrl). type: "fixed" | "adaptive";
    estimator: a KL_ESTIMATORS name (verl's algorithm.kl_penalty)."""

    type: str = "fixed"
    kl_coef: float = 0.001
    target_kl: float = 0.1
    horizon: int = 10000
    estimator: str = "k1"

    @classmethod
    def from_config(cls, kl_ctrl) -> "KLRewardOptions":
        """From megarl.config's KLControlConfig (algorithm.kl_ctrl); the estimator keeps its default."""
        return cls(type=kl_ctrl.type, kl_coef=kl_ctrl.kl_coef, target_kl=kl_ctrl.target_kl, horizon=kl_ctrl.horizon)

    def __post_init__(self):
        if self.type not in ("fixed", "adaptive"):
            raise ValueError(f"unknown kl controller type {self.type!r}; registered: adaptive, fixed")
        KL_ESTIMATORS.check(self.estimator)

    def make_controller(self) -> FixedKLController | AdaptiveKLController:
        if self.type == "fixed":
            return FixedKLController(self.kl_coef)
        return AdaptiveKLController(self.kl_coef, self.target_kl, self.horizon)


def apply_kl_penalty(
    token_level_scores: torch.Tensor,
    old_log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    controller: FixedKLController | AdaptiveKLController,
    estimator: str = "k1",
) -> tuple[torch.Tensor, dict[str, float]]:
    """token_level_rewards = scores - beta * KL_t on response tokens; then updates the controller.

    All tensors `[batch, seq]` (the whole batch). The controller sees the batch KL: the token-mean
    per sequence, averaged over sequences. Returns (token_level_rewards, metrics).
    """
    mask = response_mask.to(token_level_scores.dtype)
    kl = kl_divergence(old_log_prob, ref_log_prob, estimator) * mask
    beta = controller.value
    rewards = token_level_scores - beta * kl
    current_kl = masked_mean(kl, mask, dim=-1).mean().item()
    controller.update(current_kl, n_steps=token_level_scores.shape[0])
    return rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}
