"""The advantage estimators, KL estimators and aggregation mode added for verl 0.9.1 users, against
hand computations and naive per-group loops written here from the papers' formulas; uneven masks and
a singleton group in every grouped case."""

import math

import pytest
import torch

from megarl.algorithms import AdvantageOptions, aggregate_loss, compute_advantages, kl_divergence

# groups: "a" (3 samples), "b" (singleton), "c" (2 samples); uneven response lengths 2, 3, 1, 4, 2, 3
MASK = torch.tensor([
    [0, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 0, 0],
    [0, 0, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 0],
    [0, 0, 0, 1, 1, 0],
    [0, 0, 1, 1, 1, 0],
], dtype=torch.float32)
UIDS = ["a", "a", "b", "a", "c", "c"]
SCORES = [1.0, 0.0, 0.5, 2.0, 0.0, -1.0]


def outcome_rewards(scores=SCORES):
    rewards = torch.zeros_like(MASK)
    for row, score in enumerate(scores):
        last = int(MASK[row].nonzero().max())
        rewards[row, last] = score
    return rewards


def broadcast(per_row):
    return torch.tensor(per_row, dtype=torch.float32).unsqueeze(-1) * MASK


def groups():
    out = {}
    for row, uid in enumerate(UIDS):
        out.setdefault(uid, []).append(row)
    return out


def test_remax_subtracts_the_greedy_score_from_the_reward_to_go():
    rewards = outcome_rewards()
    rewards[3, 2] = 0.25  # a process reward inside a response: the reward-to-go changes along it
    baselines = torch.tensor([0.5, 0.5, 1.0, 0.5, -0.5, -0.5])
    adv, ret = compute_advantages("remax", rewards, MASK, reward_baselines=baselines)
    expected_ret = torch.zeros_like(MASK)
    for row in range(6):
        running = 0.0
        for t in reversed(range(MASK.shape[1])):
            if MASK[row, t]:
                running += float(rewards[row, t])
                expected_ret[row, t] = running
    torch.testing.assert_close(ret, expected_ret)
    torch.testing.assert_close(adv, (expected_ret - baselines.float().unsqueeze(-1)) * MASK)
    assert adv[3, 1] == pytest.approx(2.25 - 0.5) and adv[3, 4] == pytest.approx(2.0 - 0.5)
    with pytest.raises(ValueError, match="needs reward_baselines"):
        compute_advantages("remax", rewards, MASK)


def test_opo_uses_the_length_weighted_group_mean():
    adv, ret = compute_advantages("opo", outcome_rewards(), MASK, uids=UIDS)
    lengths = MASK.sum(-1).tolist()
    expected = []
    for row, uid in enumerate(UIDS):
        members = groups()[uid]
        if len(members) == 1:
            baseline = 0.0
        else:
            baseline = sum(lengths[j] * SCORES[j] for j in members) / sum(lengths[j] for j in members)
        expected.append(SCORES[row] - baseline)
    # by hand for group a: (2*1 + 3*0 + 4*2) / 9 = 10/9
    assert expected[0] == pytest.approx(1 - 10 / 9)
    torch.testing.assert_close(adv, broadcast(expected))
    torch.testing.assert_close(ret, adv)


def test_gpg_rescales_the_centred_score_by_batch_over_nonzero():
    adv, _ = compute_advantages("gpg", outcome_rewards(), MASK, uids=UIDS)
    alpha = 6 / 4  # two of the six scores are zero
    expected = []
    for row, uid in enumerate(UIDS):
        members = groups()[uid]
        mean = 0.0 if len(members) == 1 else sum(SCORES[j] for j in members) / len(members)
        expected.append(alpha * (SCORES[row] - mean))
    torch.testing.assert_close(adv, broadcast(expected))


def test_grpo_passk_only_the_best_of_each_group_learns():
    uids = ["a", "a", "c", "a", "c", "c"]  # no singleton (pass@k refuses those)
    scores = [1.0, 0.0, 0.5, 2.0, 0.0, 0.5]  # group c ties at its maximum (0.5, 0.5)
    adv, _ = compute_advantages("grpo_passk", outcome_rewards(scores), MASK, uids=uids)
    std_a = torch.tensor([1.0, 0.0, 2.0]).std().item()  # unbiased
    expected = [0.0, 0.0, 0.0, (2.0 - 1.0) / (std_a + 1e-6), 0.0, 0.0]
    torch.testing.assert_close(adv, broadcast(expected))
    plain, _ = compute_advantages("grpo_passk", outcome_rewards(scores), MASK, uids=uids,
                                  options=AdvantageOptions(norm_adv_by_std=False))
    torch.testing.assert_close(plain, broadcast([0, 0, 0, 1.0, 0, 0]))


def test_grpo_passk_refuses_a_singleton_group():
    with pytest.raises(ValueError, match=r"at least 2 samples per prompt group .* groups \['b'\] have one"):
        compute_advantages("grpo_passk", outcome_rewards(), MASK, uids=UIDS)


def _naive_otb(rewards, mask, uids, old, sum_sq, by_loss_token, zero_tail):
    """Per group, per aligned position k: B_k = sum_i G_ik W_ik / (sum_i W_ik + 1e-8)."""
    rows = []
    for row in range(mask.shape[0]):
        if by_loss_token:
            pos = [t for t in range(mask.shape[1]) if mask[row, t]]
        else:
            pos = list(range(mask.shape[1]))
        g, w = [], []
        running = [0.0] * mask.shape[1]
        tail = 0.0
        for t in reversed(range(mask.shape[1])):
            if mask[row, t]:
                tail += float(rewards[row, t])
            running[t] = tail if mask[row, t] else 0.0
        acc_t, cumulative = 0.0, []
        for t in range(mask.shape[1]):
            if mask[row, t]:
                acc_t += 1 - 2 * math.exp(float(old[row, t])) + float(sum_sq[row, t])
            cumulative.append(acc_t if mask[row, t] else 0.0)
        for t in pos:
            g.append(running[t])
            w.append(cumulative[t])
        rows.append((pos, g, w, [float(mask[row, t]) for t in pos]))
    adv = torch.zeros(mask.shape, dtype=torch.float64)
    members_of = {}
    for row, uid in enumerate(uids):
        members_of.setdefault(uid, []).append(row)
    for members in members_of.values():
        width = max(len(rows[r][0]) for r in members)
        baseline = [0.0] * width
        if len(members) > 1:
            for k in range(width):
                num = sum(rows[r][1][k] * rows[r][2][k] * rows[r][3][k] for r in members if k < len(rows[r][0]))
                den = sum(rows[r][2][k] * rows[r][3][k] for r in members if k < len(rows[r][0]))
                baseline[k] = num / (den + 1e-8)
        lengths = {r: int(mask[r].sum()) for r in members}
        ordered = sorted(lengths.values(), reverse=True)
        for r in members:
            pos, g, _, m = rows[r]
            seen = 0
            for k, t in enumerate(pos):
                if not m[k]:
                    continue
                seen += 1
                b = baseline[k]
                if zero_tail and len(members) > 1 and lengths[r] == ordered[0] and ordered[0] > ordered[1] \
                        and list(lengths.values()).count(ordered[0]) == 1 and seen > ordered[1]:
                    b = 0.0
                adv[r, t] = g[k] - b
    return adv


@pytest.mark.parametrize("name, by_loss_token, zero_tail", [
    ("optimal_token_baseline", False, False), ("tir_optimal_token_baseline", True, True)])
def test_optimal_token_baseline_matches_a_per_group_loop(name, by_loss_token, zero_tail):
    g = torch.Generator().manual_seed(3)
    rewards = outcome_rewards()
    rewards[1, 2] = 0.3
    mask = MASK.clone()
    mask[3, 2] = 0  # a multi-turn gap (tool output) inside a response: the two alignments differ
    old = -torch.rand(mask.shape, generator=g) * 2
    sum_sq = torch.rand(mask.shape, generator=g) * 0.5
    adv, ret = compute_advantages(name, rewards, mask, uids=UIDS, old_log_prob=old, sum_pi_squared=sum_sq)
    expected = _naive_otb(rewards, mask, UIDS, old, sum_sq, by_loss_token, zero_tail)
    torch.testing.assert_close(adv, expected.float(), rtol=0, atol=1e-6)
    singleton = UIDS.index("b")
    torch.testing.assert_close(adv[singleton], ret[singleton])  # no baseline: advantage = reward-to-go
    with pytest.raises(ValueError, match="needs sum_pi_squared"):
        compute_advantages(name, rewards, mask, uids=UIDS, old_log_prob=old)


def test_straight_through_kl_has_the_base_value_and_the_k2_gradient():
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    for plus, base in [("k1+", "k1"), ("kl+", "k1"), ("k3+", "k3"), ("low_var_kl+", "k3"), ("abs+", "abs")]:
        lp = (ref + torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
        value = kl_divergence(lp, ref, plus)
        torch.testing.assert_close(value.detach(), kl_divergence(lp.detach(), ref, base), rtol=0, atol=0)
        value.sum().backward()
        torch.testing.assert_close(lp.grad, (lp - ref).detach(), rtol=0, atol=1e-15)  # d/dlp of (lp - ref)^2 / 2


def test_token_sum_adds_the_masked_values():
    values = torch.arange(36, dtype=torch.float32).reshape(6, 6)
    assert aggregate_loss(values, MASK, "token-sum").item() == pytest.approx(float((values * MASK).sum()))
    # rows 0 and 2 by hand: 1 + 2 + 14
    assert aggregate_loss(values[[0, 2]], MASK[[0, 2]], "token-sum").item() == 17.0
