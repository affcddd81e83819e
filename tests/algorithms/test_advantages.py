"""Advantage estimators on small literal batches; every expected number is worked out here by hand."""

import math

import pytest
import torch

from megarl.algorithms import (
    AdvantageOptions,
    compute_advantages,
    filter_equal_reward_groups,
    outcome_token_rewards,
    sequence_scores,
)

EPS = 1e-6

# Six samples of three prompts, given out of order. Per-token tensors are [batch, seq] aligned with
# input_ids; position 0 is the prompt (mask 0); the outcome reward sits on the last response token.
#   group "a": rows 0, 2, 4 with scores 1, 0, 1   (unequal response lengths 3, 1, 4)
#   group "b": rows 1, 5 with scores 0.5, 0.5     (all equal)
#   group "c": row 3 with score 2                 (a group of size 1)
UIDS = ["a", "b", "a", "c", "a", "b"]
MASK = torch.tensor([
    [0, 1, 1, 1, 0],
    [0, 0, 1, 1, 1],
    [0, 1, 0, 0, 0],
    [0, 1, 1, 0, 0],
    [0, 1, 1, 1, 1],
    [0, 1, 1, 0, 0],
], dtype=torch.float32)
REWARDS = torch.zeros(6, 5)
REWARDS[0, 3], REWARDS[1, 4], REWARDS[2, 1], REWARDS[3, 2], REWARDS[4, 4], REWARDS[5, 2] = 1, 0.5, 0, 2, 1, 0.5


def per_row(values):
    return torch.tensor(values, dtype=torch.float32).unsqueeze(-1) * MASK


def test_grpo_group_mean_and_std_by_uid_with_singleton_and_all_equal_groups():
    std_a = math.sqrt(((1 / 3) ** 2 + (2 / 3) ** 2 + (1 / 3) ** 2) / 2)  # unbiased: n - 1 = 2
    expected = per_row([
        (1 - 2 / 3) / (std_a + EPS),
        0.0,  # all-equal group: 0 / (0 + eps)
        (0 - 2 / 3) / (std_a + EPS),
        2 / (1 + EPS),  # singleton: baseline 0, std 1 (verl's convention)
        (1 - 2 / 3) / (std_a + EPS),
        0.0,
    ])
    adv, returns = compute_advantages("grpo", REWARDS, MASK, uids=UIDS)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, expected, rtol=0, atol=1e-6)
    assert adv[0, 1].item() == pytest.approx(0.57735, abs=1e-5)


def test_dr_grpo_does_not_divide_by_std():
    adv, _ = compute_advantages("grpo", REWARDS, MASK, uids=UIDS, options=AdvantageOptions(norm_adv_by_std=False))
    torch.testing.assert_close(adv, per_row([1 / 3, 0, -2 / 3, 2, 1 / 3, 0]), rtol=0, atol=1e-7)


def test_groups_follow_uids_not_positions():
    order = [3, 5, 0, 4, 1, 2]
    adv, _ = compute_advantages("grpo", REWARDS, MASK, uids=UIDS)
    shuffled, _ = compute_advantages("grpo", REWARDS[order], MASK[order], uids=[UIDS[i] for i in order])
    torch.testing.assert_close(shuffled, adv[order], rtol=0, atol=0)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # a: 1 - mean(0, 1) = 0.5, 0 - mean(1, 1) = -1, 1 - mean(1, 0) = 0.5; b: 0; c (singleton): raw 2
    adv, _ = compute_advantages("rloo", REWARDS, MASK, uids=UIDS)
    torch.testing.assert_close(adv, per_row([0.5, 0, -1, 2, 0.5, 0]), rtol=0, atol=1e-7)


def test_reinforce_plus_plus_baseline_centres_by_group_then_whitens_over_tokens():
    mask = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.float32)
    rewards = torch.tensor([[0, 1.0, 0], [0, 0.0, 0], [0, 0, 3.0]])
    # centred scores: a: 0.5, -0.5; b (singleton): 3 -> tokens 0.5, -0.5, 3, 3
    tokens = [0.5, -0.5, 3.0, 3.0]
    mean = sum(tokens) / 4  # 1.5
    var = sum((t - mean) ** 2 for t in tokens) / 3  # (1 + 4 + 2.25 + 2.25) / 3
    scale = 1 / math.sqrt(var + 1e-8)
    expected = torch.tensor([[0, -1.0 * scale, 0], [0, -2.0 * scale, 0], [0, 1.5 * scale, 1.5 * scale]])
    adv, _ = compute_advantages("reinforce_plus_plus_baseline", rewards, mask, uids=["a", "a", "b"])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_reinforce_plus_plus_discounts_over_response_tokens_and_whitens_globally():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.float32)
    rewards = torch.tensor([[0, 0, 0, 1.0], [0, 0, -1.0, 0], [0, 0, 0, 1.0]])
    # gamma 0.5. Row 2 has a tool-output token at position 2 (mask 0): it neither discounts nor adds.
    returns = torch.tensor([[0, 0.25, 0.5, 1.0], [0, -0.5, -1.0, 0], [0, 0.5, 0, 1.0]])
    tokens = [0.25, 0.5, 1.0, -0.5, -1.0, 0.5, 1.0]
    mean = sum(tokens) / 7
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / 6 + 1e-8)
    adv, ret = compute_advantages("reinforce_plus_plus", rewards, mask, options=AdvantageOptions(gamma=0.5))
    torch.testing.assert_close(ret, returns, rtol=0, atol=1e-7)
    torch.testing.assert_close(adv, (returns - mean) / std * mask, rtol=0, atol=1e-6)


def test_gae_by_hand_including_a_masked_observation_token():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.float32)
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.0, 1.0, 5.0, 3.0]])
    rewards = torch.tensor([[0, 0, 0, 1.0], [0, 0, 0, 1.0]])
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72), V after the last token = 0.
    # row 0: t3: 1 - 3 = -2; t2: 0.9*3 - 2 = 0.7 -> 0.7 + 0.72*(-2) = -0.74;
    #        t1: 0.9*2 - 1 = 0.8 -> 0.8 + 0.72*(-0.74) = 0.2672
    # row 1: t3: -2; t2 is an observation (skipped: V=5 unused); t1: 0.9*3 - 1 = 1.7 -> 1.7 - 1.44 = 0.26
    raw = torch.tensor([[0, 0.2672, -0.74, -2.0], [0, 0.26, 0, -2.0]])
    opts = AdvantageOptions(gamma=0.9, lam=0.8, whiten_gae=False)
    adv, ret = compute_advantages("gae", rewards, mask, values=values, options=opts)
    torch.testing.assert_close(adv, raw, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, torch.tensor([[0, 1.2672, 1.26, 1.0], [0, 1.26, 0, 1.0]]), rtol=0, atol=1e-6)

    tokens = [0.2672, -0.74, -2.0, 0.26, -2.0]
    mean = sum(tokens) / 5
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / 4 + 1e-8)
    whitened, ret2 = compute_advantages("gae", rewards, mask, values=values, options=AdvantageOptions(gamma=0.9, lam=0.8))
    torch.testing.assert_close(whitened, (raw - mean) / std * mask, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret2, ret)


def test_gae_with_gamma_lambda_one_is_return_minus_value():
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.float32)
    values = torch.tensor([[0, 0.5, 0.25, 0.125]])
    rewards = torch.tensor([[0, 0, 0, 2.0]])
    adv, ret = compute_advantages("gae", rewards, mask, values=values, options=AdvantageOptions(whiten_gae=False))
    torch.testing.assert_close(adv, torch.tensor([[0, 1.5, 1.75, 1.875]]))
    torch.testing.assert_close(ret, torch.tensor([[0, 2.0, 2.0, 2.0]]))


def test_missing_inputs_and_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="needs uids"):
        compute_advantages("grpo", REWARDS, MASK)
    with pytest.raises(ValueError, match="needs values"):
        compute_advantages("gae", REWARDS, MASK)
    with pytest.raises(ValueError, match="registered: gae, gpg, grpo, grpo_passk, opo, optimal_token_baseline, reinforce_plus_plus, "):
        compute_advantages("ppo", REWARDS, MASK, uids=UIDS)
    with pytest.raises(ValueError, match="5 uids for a batch of 6"):
        compute_advantages("grpo", REWARDS, MASK, uids=UIDS[:5])


def test_dynamic_sampling_drops_groups_with_all_equal_rewards():
    uids = ["a", "a", "b", "b", "c", "d", "d", "d"]
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    result = filter_equal_reward_groups(scores, uids)
    assert result.keep.tolist() == [True, True, False, False, True, False, False, False]
    assert (result.num_groups, result.num_dropped_groups, result.num_kept_samples) == (4, 2, 3)
    assert result.metrics()["dynamic_sampling/num_dropped_groups"] == 2.0


def test_sequence_scores_sum_each_row():
    assert sequence_scores(REWARDS).tolist() == [1.0, 0.5, 0.0, 2.0, 1.0, 0.5]


def test_outcome_rewards_go_on_the_last_response_token():
    rewards = outcome_token_rewards(torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.5]), MASK)
    torch.testing.assert_close(rewards, REWARDS, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        outcome_token_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[0, 1], [0, 0]]))
