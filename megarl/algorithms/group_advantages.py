"""Outcome-reward estimators with other baselines than GRPO's group mean: ReMax, OPO, GPG, GRPO pass@k.

Conventions as in advantages.py: `[batch, seq]` token rewards (a sequence's score is its row sum),
`response_mask`, groups by prompt uid, results zero outside the mask, group statistics in float64.
"""

from __future__ import annotations

import torch

from megarl.algorithms.advantages import (
    AdvantageOptions,
    _broadcast,
    _require,
    discounted_returns,
    group_index,
    group_stats,
    register_advantage,
    sequence_scores,
)


@register_advantage("remax")
def remax(*, token_level_rewards, response_mask, reward_baselines, **_):
    """ReMax (Li et al., arXiv:2310.10505): the baseline of a sampled response is the score of the
    GREEDY response to the same prompt, b = r(x, y_greedy).

    returns_t = sum_{t' >= t} r_t' over mask tokens (undiscounted reward-to-go);
    A_t = returns_t - b. reward_baselines: `[batch]`, each sample's prompt's greedy score (the
    trainer generates it: algorithm.adv_estimator=remax adds a greedy rollout per prompt).
    """
    _require(reward_baselines, "reward_baselines (the greedy response's score per sample)", "remax")
    if reward_baselines.shape != token_level_rewards.shape[:1]:
        raise ValueError(f"reward_baselines must be [batch] = {tuple(token_level_rewards.shape[:1])}, "
                         f"got {tuple(reward_baselines.shape)}")
    returns = discounted_returns(token_level_rewards, response_mask, 1.0)
    adv = returns - reward_baselines.to(torch.float64).unsqueeze(-1) * response_mask.to(torch.float64)
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


@register_advantage("opo")
def opo(*, token_level_rewards, response_mask, uids, **_):
    """OPO (Hao et al., "On-Policy RL with Optimal Reward Baseline", arXiv:2505.23585): the baseline
    is the group's LENGTH-WEIGHTED mean score, b = sum_j |y_j| r_j / sum_j |y_j| (|y| = response
    tokens), A_i = r_i - b. A singleton group has baseline 0.
    """
    _require(uids, "uids (prompt ids)", "opo")
    scores = sequence_scores(token_level_rewards)
    lengths = response_mask.to(torch.float64).sum(-1)
    index, num_groups = group_index(uids)
    index = index.to(scores.device)
    weighted = torch.zeros(num_groups, dtype=torch.float64, device=scores.device).index_add_(0, index, lengths * scores)
    total_len = torch.zeros_like(weighted).index_add_(0, index, lengths)
    size = torch.zeros_like(weighted).index_add_(0, index, torch.ones_like(scores))
    baseline = torch.where(size > 1, weighted / total_len.clamp(min=1), torch.zeros_like(weighted))[index]
    adv = _broadcast(scores - baseline, token_level_rewards, response_mask)
    return adv, adv


@register_advantage("gpg")
def gpg(*, token_level_rewards, response_mask, uids, **_):
    """GPG (Chu et al., "GPG: A Simple and Strong RL Baseline", arXiv:2504.02546):
    A_i = alpha * (r_i - group mean), alpha = B / M with B the batch's samples and M those with a
    non-zero score (at least 1): it rescales the gradient to the samples that carry signal. No std
    division. A singleton group has mean 0 (its advantage is alpha * r_i).
    """
    _require(uids, "uids (prompt ids)", "gpg")
    scores = sequence_scores(token_level_rewards)
    alpha = scores.numel() / max(int(torch.count_nonzero(scores)), 1)
    adv = _broadcast(alpha * (scores - group_stats(scores, uids).mean), token_level_rewards, response_mask)
    return adv, adv


@register_advantage("grpo_passk")
def grpo_passk(*, token_level_rewards, response_mask, uids, options: AdvantageOptions, **_):
    """GRPO for pass@k (arXiv:2503.19595, as verl): only the best response of each group learns,
    with A = (r_max - r_second) / (std + epsilon) (unbiased group std; without the division if not
    norm_adv_by_std); every other response gets 0. Ties for the maximum give 0. Groups need at
    least 2 samples (rollout.n >= 2); a singleton group is an error.
    """
    _require(uids, "uids (prompt ids)", "grpo_passk")
    scores = sequence_scores(token_level_rewards)
    index, num_groups = group_index(uids)
    stats = group_stats(scores, uids)
    if bool((stats.size < 2).any()):
        singles = sorted({uids[i] for i in (stats.size < 2).nonzero().flatten().tolist()})
        raise ValueError(f"grpo_passk needs at least 2 samples per prompt group (rollout.n >= 2); "
                         f"groups {singles} have one")
    adv = torch.zeros_like(scores)
    for group in range(num_groups):
        members = (index == group).nonzero().flatten()
        ranked = scores[members].argsort(descending=True, stable=True)
        best, second = members[ranked[0]], members[ranked[1]]
        gap = scores[best] - scores[second]
        adv[best] = gap / (stats.std[best] + options.epsilon) if options.norm_adv_by_std else gap
    adv = _broadcast(adv, token_level_rewards, response_mask)
    return adv, adv
