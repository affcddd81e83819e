"""The gradient (and every metric) must not depend on how the mini-batch is split.

For each loss_agg_mode, PPO and GSPO (with KL loss, entropy bonus, truncated IS and rejection) and the
critic loss are computed on the whole batch, on 1, 2 and 4 micro-batches, and on 2 gloo DP ranks with
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
)
from megarl.testing.distributed import run_on_ranks

BATCH, SEQ = 10, 12
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
POLICY_OPTIONS = {
    "ppo": dict(policy_loss="ppo", clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, use_kl_loss=True,
                kl_loss_type="low_var_kl", kl_loss_coef=0.1, entropy_coeff=0.01,
                rollout_correction=RolloutCorrectionOptions(level="token", is_cap=1.5, reject_above=3.0)),
    "gspo": dict(policy_loss="gspo", clip_ratio=0.05, use_kl_loss=True, kl_loss_type="k2", kl_loss_coef=0.1,
                 entropy_coeff=0.01, rollout_correction=RolloutCorrectionOptions(level="sequence", is_cap=1.2)),
}


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of varied prompt/response lengths (one with no response token), off-policy log-probs."""
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
                    entropy=entropy[mb],
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
                grad = torch.as_tensor(grad)
                expected = ref[tensor_name] if rows is None else ref[tensor_name][rows]
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
