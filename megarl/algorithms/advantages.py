"""Advantage estimators: whole-batch functions from token rewards to per-token advantages.

Every estimator takes `[batch, seq]` tensors aligned with input_ids (see INTERFACES.md):
  token_level_rewards  the reward of each token; an outcome reward sits on the last response token,
                       KL penalties (if any) on every response token. A sequence's score is the sum
                       of its row.
  response_mask        1 on the response tokens the advantage is broadcast to / computed over.
and returns `(advantages, returns)`, both `[batch, seq]`, zero outside the mask, float32 like the
rewards. Group statistics are computed in float64.

Groups (GRPO, RLOO, REINFORCE++-baseline) are identified by each sample's prompt uid, never by its
position, so a shuffled or filtered batch still finds its group. A group of one sample has no
baseline: as in verl its baseline is 0 and its std 1, so its advantage is its raw score. A group
whose rewards are all equal gets zero advantages (std 0, the 1e-6 epsilon keeps it finite).

Register your own with `@register_advantage("name")`; it receives keyword arguments
token_level_rewards, response_mask, uids, values, options, and the optional rollout inputs
reward_baselines (`[batch]`, ReMax), old_log_prob and sum_pi_squared (`[batch, seq]`, optimal token
baseline) (ignore what you do not need).

Further estimators: remax, opo, gpg, grpo_passk in group_advantages.py; optimal_token_baseline and
tir_optimal_token_baseline in token_baseline.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from megarl.algorithms.aggregation import masked_whiten
from megarl.utils.registry import Registry

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = ADVANTAGE_ESTIMATORS.register


@dataclass
class AdvantageOptions:
    """gamma, lam: discount and GAE lambda (gae, reinforce_plus_plus). norm_adv_by_std: GRPO divides
    by the group std (False = Dr.GRPO). epsilon: added to the std. whiten_gae: whiten GAE advantages
    over the batch's mask tokens (verl does)."""

    gamma: float = 1.0
    lam: float = 1.0
    norm_adv_by_std: bool = True
    epsilon: float = 1e-6
    whiten_gae: bool = True

    @classmethod
    def from_config(cls, algorithm) -> "AdvantageOptions":
        """From megarl.config's AlgorithmConfig (epsilon and whiten_gae are not config fields)."""
        return cls(gamma=algorithm.gamma, lam=algorithm.lam, norm_adv_by_std=algorithm.norm_adv_by_std)

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma} lam={self.lam}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")


def compute_advantages(
    name: str,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    uids: Sequence[Hashable] | torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    options: AdvantageOptions | None = None,
    reward_baselines: torch.Tensor | None = None,
    old_log_prob: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the registered estimator `name`. Returns (advantages, returns), each `[batch, seq]`.

    reward_baselines: `[batch]` the score of each sample's baseline response (ReMax: the greedy
    response to the same prompt). old_log_prob, sum_pi_squared: `[batch, seq]` the sampled token's
    log-prob and sum_v pi_v^2 under the sampling policy (optimal token baseline)."""
    fn = ADVANTAGE_ESTIMATORS.get(name)
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [batch, seq]"
        )
    if uids is not None and len(uids) != token_level_rewards.shape[0]:
        raise ValueError(f"{len(uids)} uids for a batch of {token_level_rewards.shape[0]} samples")
    return fn(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        uids=uids,
        values=values,
        options=options or AdvantageOptions(),
        reward_baselines=reward_baselines,
        old_log_prob=old_log_prob,
        sum_pi_squared=sum_pi_squared,
    )


# ----------------------------------------------------------------------------------------------------
# Groups


def group_index(uids: Sequence[Hashable] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map prompt uids to dense group ids in order of first appearance: (`[batch]` long, num_groups)."""
    if isinstance(uids, torch.Tensor):
        uids = uids.tolist()
    ids: dict[Hashable, int] = {}
    index = [ids.setdefault(uid, len(ids)) for uid in uids]
    return torch.tensor(index, dtype=torch.long), len(ids)


@dataclass
class GroupStats:
    """Per-sample view of its group: size, mean and unbiased std of the scores (`[batch]` each)."""

    size: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def group_stats(scores: torch.Tensor, uids) -> GroupStats:
    """Group statistics of `scores` `[batch]` (float64). Singletons: mean 0, std 1 (no baseline)."""
    index, num_groups = group_index(uids)
    index = index.to(scores.device)
    scores = scores.to(torch.float64)
    size = torch.zeros(num_groups, dtype=torch.float64, device=scores.device).index_add_(
        0, index, torch.ones_like(scores)
    )
    total = torch.zeros_like(size).index_add_(0, index, scores)
    mean = (total / size)[index]
    sq_dev = torch.zeros_like(size).index_add_(0, index, (scores - mean) ** 2)
    var = sq_dev / (size - 1).clamp(min=1)
    size, std = size[index], var.sqrt()[index]
    single = size == 1
    return GroupStats(
        size=size,
        mean=torch.where(single, torch.zeros_like(mean), mean),
        std=torch.where(single, torch.ones_like(mean), std),
    )


def outcome_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's outcome score on its last response token: `[batch]` -> `[batch, seq]`.

    Use the RESPONSE mask (every generated token), not a loss mask that filtering may have emptied:
    a sequence's score must still count in its group's statistics.
    """
    has_token = response_mask.bool().any(-1)
    if not bool(has_token.all()):
        rows = (~has_token).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response token to carry their outcome reward")
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
    last = torch.where(response_mask.bool(), positions, -1).amax(-1)
    rewards = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    rewards[torch.arange(len(last), device=last.device), last] = scores.to(rewards.dtype)
    return rewards


def sequence_scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    """Each sequence's score: the sum of its token rewards, `[batch]` float64."""
    return token_level_rewards.to(torch.float64).sum(-1)


def _broadcast(per_sequence: torch.Tensor, like: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_sequence.unsqueeze(-1) * mask.to(torch.float64)).to(like.dtype)


def _require(what, name: str, estimator: str):
    if what is None:
        raise ValueError(f"advantage estimator {estimator!r} needs {name}")


# ----------------------------------------------------------------------------------------------------
# Outcome-reward estimators


@register_advantage("grpo")
def grpo(*, token_level_rewards, response_mask, uids, options: AdvantageOptions, **_):
    """(score - group mean) / (group std + eps); without the std division if not norm_adv_by_std."""
    _require(uids, "uids (prompt ids)", "grpo")
    scores = sequence_scores(token_level_rewards)
    stats = group_stats(scores, uids)
    adv = scores - stats.mean
    if options.norm_adv_by_std:
        adv = adv / (stats.std + options.epsilon)
    adv = _broadcast(adv, token_level_rewards, response_mask)
    return adv, adv


@register_advantage("rloo")
def rloo(*, token_level_rewards, response_mask, uids, **_):
    """score - mean of the OTHER samples of the group = n/(n-1) * (score - group mean)."""
    _require(uids, "uids (prompt ids)", "rloo")
    scores = sequence_scores(token_level_rewards)
    stats = group_stats(scores, uids)
    n = stats.size
    adv = torch.where(n > 1, (scores - stats.mean) * n / (n - 1).clamp(min=1), scores)
    adv = _broadcast(adv, token_level_rewards, response_mask)
    return adv, adv


@register_advantage("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(*, token_level_rewards, response_mask, uids, **_):
    """score - group mean, broadcast to the tokens, then whitened over all mask tokens of the batch."""
    _require(uids, "uids (prompt ids)", "reinforce_plus_plus_baseline")
    scores = sequence_scores(token_level_rewards)
    centred = scores - group_stats(scores, uids).mean
    adv = masked_whiten(_broadcast(centred, token_level_rewards, response_mask).double(), response_mask)
    adv = adv.to(token_level_rewards.dtype)
    return adv, adv


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_next over mask tokens, `[batch, seq]`; tokens outside the mask (prompt,
    tool output, padding) neither add reward nor discount: the return flows through them unchanged."""
    mask = mask.to(torch.float64)
    rewards = rewards.to(torch.float64) * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


@register_advantage("reinforce_plus_plus")
def reinforce_plus_plus(*, token_level_rewards, response_mask, options: AdvantageOptions, **_):
    """Discounted return of each token, whitened over all mask tokens of the batch (no critic)."""
    returns = discounted_returns(token_level_rewards, response_mask, options.gamma)
    adv = masked_whiten(returns, response_mask).to(token_level_rewards.dtype)
    return adv, returns.to(token_level_rewards.dtype)


@register_advantage("gae")
def gae(*, token_level_rewards, response_mask, values, options: AdvantageOptions, **_):
    """Generalised advantage estimation with the critic's `values` `[batch, seq]`, aligned like
    log-probs: values[b, t] = V(state before token t), i.e. the critic's output at position t-1.

    delta_t = r_t + gamma * V(next mask token) - V_t;  A_t = delta_t + gamma * lam * A(next mask token).
    The value after the last response token is 0. Tokens outside the mask are skipped (multi-turn
    observations do not break the chain). returns = A + V (before whitening, the critic's target).
    """
    _require(values, "values (the critic's per-token values)", "gae")
    if values.shape != token_level_rewards.shape:
        raise ValueError(f"values {tuple(values.shape)} must match rewards {tuple(token_level_rewards.shape)}")
    mask = response_mask.to(torch.float64)
    rewards, vals = token_level_rewards.to(torch.float64), values.to(torch.float64).detach()
    gamma, lam = options.gamma, options.lam
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - vals[:, t]
        here = mask[:, t] > 0
        next_adv = torch.where(here, delta + gamma * lam * next_adv, next_adv)
        next_value = torch.where(here, vals[:, t], next_value)
        adv[:, t] = next_adv
    returns = (adv + vals) * mask
    adv = adv * mask
    if options.whiten_gae:
        adv = masked_whiten(adv, mask)
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


# ----------------------------------------------------------------------------------------------------
# DAPO dynamic sampling


@dataclass
class GroupFilterResult:
    """keep: `[batch]` bool, True for samples of groups with informative (not all equal) rewards."""

    keep: torch.Tensor
    num_groups: int
    num_dropped_groups: int

    @property
    def num_kept_samples(self) -> int:
        return int(self.keep.sum())

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic_sampling/num_groups": float(self.num_groups),
            "dynamic_sampling/num_dropped_groups": float(self.num_dropped_groups),
            "dynamic_sampling/num_kept_samples": float(self.num_kept_samples),
        }


def filter_equal_reward_groups(scores: torch.Tensor, uids) -> GroupFilterResult:
    """DAPO dynamic sampling: drop every group whose scores are all equal (zero advantage, no signal).

    scores: `[batch]` sequence scores (e.g. `sequence_scores(token_level_rewards)`). A single-sample
    group is kept (as in DAPO: nothing to compare it with, not proof of a zero-variance prompt).
    """
    if scores.dim() != 1 or len(uids) != scores.shape[0]:
        raise ValueError(f"scores must be [batch] with one uid each, got {tuple(scores.shape)} and {len(uids)} uids")
    index, num_groups = group_index(uids)
    index = index.to(scores.device)
    scores = scores.to(torch.float64)
    lo = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=scores.device)
    hi = torch.full_like(lo, float("-inf"))
    lo = lo.scatter_reduce(0, index, scores, reduce="amin")
    hi = hi.scatter_reduce(0, index, scores, reduce="amax")
    size = torch.bincount(index, minlength=num_groups)
    informative = (hi > lo) | (size == 1)
    return GroupFilterResult(
        keep=informative[index], num_groups=num_groups, num_dropped_groups=int((~informative).sum())
    )
