"""The gradient (and every metric) must not depend on how the mini-batch is split.

For each loss_agg_mode, every registered policy loss (PPO and GSPO with KL loss, entropy bonus,
truncated IS and rejection; the verl-0.9.1 losses with their options and a KL estimator each) and
the critic loss are computed on the whole batch, on 1, 2 and 4 micro-batches, and on 2 gloo DP ranks with
2 micro-batches each (normalisers all-reduced). Gradients summed over micro-batches and ranks must
equal the whole-batch gradient to 1e-6, and metrics summed likewise must equal the whole-batch ones.
"""

import pytest
import torch

from megarl.algorithms import (
    PolicyLossOptions,
    RolloutCorrectionOptions,
    apply_rollout_rejection,
    compute_loss_normalisers,
    compute_policy_loss,
    compute_value_loss,
    prepare_policy_loss_inputs,
)
from megarl.testing.distributed import run_on_ranks

BATCH, SEQ = 10, 12
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"]
TIS = RolloutCorrectionOptions(level="token", is_cap=1.5, reject_above=3.0)
COMMON = dict(use_kl_loss=True, kl_loss_coef=0.1, entropy_coeff=0.01)
POLICY_OPTIONS = {
    "ppo": dict(policy_loss="ppo", clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, use_kl_loss=True,
                kl_loss_type="low_var_kl", kl_loss_coef=0.1, entropy_coeff=0.01,
                rollout_correction=RolloutCorrectionOptions(level="token", is_cap=1.5, reject_above=3.0)),
    "gspo": dict(policy_loss="gspo", clip_ratio=0.05, use_kl_loss=True, kl_loss_type="k2", kl_loss_coef=0.1,
                 entropy_coeff=0.01, rollout_correction=RolloutCorrectionOptions(level="sequence", is_cap=1.2)),
    "cispo": dict(policy_loss="cispo", clip_ratio_high=0.28, kl_loss_type="k3+", rollout_correction=TIS, **COMMON),
    "sapo": dict(policy_loss="sapo", tau_pos=1.0, tau_neg=1.05, kl_loss_type="k1+", rollout_correction=TIS, **COMMON),
    "geo_mean": dict(policy_loss="geo_mean", clip_ratio=0.4, kl_loss_type="abs+", rollout_correction=TIS, **COMMON),
    "clip_cov": dict(policy_loss="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-5.0, clip_cov_ub=5.0,
                     rollout_correction=TIS, **COMMON),
    "kl_cov": dict(policy_loss="kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.5, rollout_correction=TIS, **COMMON),
    "dppo_tv": dict(policy_loss="dppo_tv", clip_ratio=0.1, clip_ratio_c=2.0, rollout_correction=TIS, **COMMON),
    "dppo_kl": dict(policy_loss="dppo_kl", clip_ratio=0.05, clip_ratio_c=2.0, rollout_correction=TIS, **COMMON),
    "reinforce": dict(policy_loss="reinforce", rollout_correction=TIS, **COMMON),
    "dro": dict(policy_loss="dro", dro_beta=0.5, rollout_correction=TIS, **COMMON),
    "bypass_ppo": dict(policy_loss="bypass_mode", clip_ratio_high=0.28,
                       rollout_correction=RolloutCorrectionOptions(reject_above=3.0), **COMMON),
    "bypass_reinforce": dict(policy_loss="bypass_mode", bypass_loss_type="reinforce",
                             rollout_correction=RolloutCorrectionOptions(level="geometric", is_cap=1.2), **COMMON),
}


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of varied prompt/response lengths (one with no response token), off-policy log-probs.
    float64: the property is exact algebra, and token-sum's unnormalised sums (~10) would carry
    float32 rounding of ~1e-6 that has nothing to do with the split."""
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            return _make_batch(seed)
        finally:
            torch.set_default_dtype(torch.float32)


def _make_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(BATCH, SEQ)
    for row in range(BATCH):
        prompt = 1 + row % 4
        response = 0 if row == 6 else 1 + (row * 5) % (SEQ - prompt)
        mask[row, prompt : prompt + response] = 1
    old = -torch.rand(BATCH, SEQ, generator=g) * 3
    log_prob = old + 0.5 * torch.randn(BATCH, SEQ, generator=g)
    log_prob[:, 4] = old[:, 4] + 1.5  # ratio e^1.5 > 3: the dual clip bites where the advantage is < 0
    return dict(
        mask=mask,
        old_log_prob=old,
        log_prob=log_prob,
        ref_log_prob=old + 0.3 * torch.randn(BATCH, SEQ, generator=g),
        rollout_log_prob=old + 0.5 * torch.randn(BATCH, SEQ, generator=g),
        advantages=torch.randn(BATCH, 1, generator=g).expand(BATCH, SEQ).contiguous(),
        entropy=torch.rand(BATCH, SEQ, generator=g) * 2,
        values=torch.randn(BATCH, SEQ, generator=g),
        old_values=torch.randn(BATCH, SEQ, generator=g),
        returns=torch.randn(BATCH, SEQ, generator=g),
    )


def grads_and_metrics(batch, rows: torch.Tensor, num_micro_batches: int, dp_group=None) -> dict:
    """Gradients w.r.t. log_prob, entropy and values of `rows`, summed over micro-batches, and the
    summed metrics, for every (policy loss, mode) and the critic. Normalisers over `dp_group`."""
    out = {}
    for name, kw in POLICY_OPTIONS.items():
        for mode in MODES:
            options = PolicyLossOptions(loss_agg_mode=mode, **kw)
            # mini-batch-level inputs (Clip-Cov/KL-Cov selection) from the WHOLE mini-batch, as every DP
            # rank of the trainer holds it; each rank then uses its rows
            full_mask, _ = apply_rollout_rejection(batch["old_log_prob"], batch["rollout_log_prob"], batch["mask"],
                                                   options.rollout_correction)
            inputs = prepare_policy_loss_inputs(options, batch["old_log_prob"], batch["advantages"], full_mask)
            inputs = {k: v[rows] for k, v in inputs.items()}
            mask, _ = apply_rollout_rejection(batch["old_log_prob"][rows], batch["rollout_log_prob"][rows],
                                              batch["mask"][rows], options.rollout_correction, dp_group=dp_group)
            norm = compute_loss_normalisers(mask, max_response_length=SEQ, dp_group=dp_group)
            log_prob = batch["log_prob"][rows].clone().requires_grad_(True)
            entropy = batch["entropy"][rows].clone().requires_grad_(True)
            metrics = {}
            for mb in torch.arange(len(rows)).tensor_split(num_micro_batches):
                loss, m = compute_policy_loss(
                    log_prob[mb], batch["old_log_prob"][rows][mb], batch["advantages"][rows][mb], mask[mb], norm, options,
                    ref_log_prob=batch["ref_log_prob"][rows][mb], rollout_log_prob=batch["rollout_log_prob"][rows][mb],
                    entropy=entropy[mb], mini_batch_inputs={k: v[mb] for k, v in inputs.items()},
                )
                loss.backward()
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v.item()
            out[(name, mode)] = dict(log_prob=log_prob.grad, entropy=entropy.grad, metrics=metrics)
        mode = "seq-mean-token-mean"
        norm = compute_loss_normalisers(batch["mask"][rows], dp_group=dp_group)
        values = batch["values"][rows].clone().requires_grad_(True)
        metrics = {}
        for mb in torch.arange(len(rows)).tensor_split(num_micro_batches):
            loss, m = compute_value_loss(values[mb], batch["old_values"][rows][mb], batch["returns"][rows][mb],
                                         batch["mask"][rows][mb], norm, cliprange_value=0.5, loss_agg_mode=mode)
            loss.backward()
            metrics = {k: metrics.get(k, 0.0) + v.item() for k, v in m.items()}
        out[("value", mode)] = dict(values=values.grad, metrics=metrics)
    return out


def assert_same(split: dict, whole: dict, rows=None):
    for key, ref in whole.items():
        for tensor_name, grad in split[key].items():
            if tensor_name == "metrics":
                for metric, value in grad.items():
                    assert value == pytest.approx(ref["metrics"][metric], abs=1e-6), (key, metric)
            else:
                expected = ref[tensor_name] if rows is None else ref[tensor_name][rows]
                grad = torch.as_tensor(grad, dtype=expected.dtype)
                torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6, msg=f"{key} {tensor_name}")


@pytest.fixture(scope="module")
def whole_batch():
    batch = make_batch()
    return batch, grads_and_metrics(batch, torch.arange(BATCH), 1)


def test_the_reference_batch_exercises_clipping_rejection_and_capping(whole_batch):
    _, whole = whole_batch
    metrics = whole[("ppo", "token-mean")]["metrics"]
    assert metrics["pg_clipfrac"] > 0 and metrics["pg_clipfrac_lower"] > 0
    assert metrics["mismatch/is_capped_fraction"] > 0
    assert whole[("ppo", "token-mean")]["log_prob"].abs().sum() > 0
    assert whole[("gspo", "token-mean")]["metrics"]["pg_clipfrac"] > 0
    for name in POLICY_OPTIONS:
        for mode in MODES:
            assert whole[(name, mode)]["log_prob"].abs().sum() > 0, (name, mode)
    for name in ("cispo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "bypass_reinforce"):
        assert whole[(name, "token-mean")]["metrics"]["pg_clipfrac"] > 0, name  # the loss's own clip/selection bites


@pytest.mark.parametrize("num_micro_batches", [2, 4])
def test_micro_batch_split_gives_the_whole_batch_gradient(whole_batch, num_micro_batches):
    batch, whole = whole_batch
    assert_same(grads_and_metrics(batch, torch.arange(BATCH), num_micro_batches), whole)


def _dp_rank(num_micro_batches):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.arange(BATCH).tensor_split(world)[rank]
    out = grads_and_metrics(make_batch(), rows, num_micro_batches, dp_group=dist.group.WORLD)
    # the trainer all-reduces metric shares with SUM, exactly like the gradients
    for entry in out.values():
        names = sorted(entry["metrics"])
        summed = torch.tensor([entry["metrics"][n] for n in names], dtype=torch.float64)
        dist.all_reduce(summed)
        entry["metrics"] = dict(zip(names, summed.tolist()))
        for name in [n for n in entry if n != "metrics"]:
            entry[name] = entry[name].tolist()  # plain data: tensors would travel as shared-memory handles
    return rows.tolist(), out


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_dp_ranks_with_micro_batches_give_the_whole_batch_gradient(whole_batch):
    _, whole = whole_batch
    for rows, out in run_on_ranks(_dp_rank, 2, args=(2,), timeout=150):
        assert_same(out, whole, rows=rows)
