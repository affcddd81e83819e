"""The engine adapters on real SequenceBatch micro-batches: shares add up to the whole-batch loss."""

import pytest
import torch

from megarl.algorithms import PolicyLossOptions, RolloutCorrectionOptions, compute_loss_normalisers
from megarl.algorithms.engine_loss import policy_loss_fn, sft_loss_fn
from megarl.models.batch import SequenceBatch


def _batch():
    g = torch.Generator().manual_seed(3)
    lengths = [5, 3, 6, 2]
    seqs = [torch.randint(1, 50, (n,), generator=g).tolist() for n in lengths]
    mask = [[0, 0] + [1] * (n - 2) for n in lengths]
    old = [(-torch.rand(n, generator=g)).tolist() for n in lengths]
    rollout = [[x - 0.1 for x in row] for row in old]
    adv = [[a] * n for a, n in zip([1.0, -0.5, 2.0, -1.0], lengths)]
    batch = SequenceBatch.from_sequences(seqs, loss_mask=mask, old_logprobs=old, advantages=adv,
                                         ref_logprobs=old, rollout_logprobs=rollout)
    return batch, torch.tensor([[x + 0.05 for x in row] + [0.0] * (6 - len(row)) for row in old])


def test_policy_loss_fn_shares_sum_to_the_whole_batch_loss():
    batch, logprobs = _batch()
    options = PolicyLossOptions(use_kl_loss=True, rollout_correction=RolloutCorrectionOptions(is_cap=1.05))
    norm = compute_loss_normalisers(batch.fields["loss_mask"])
    assert norm.num_tokens == 3 + 1 + 4 + 0 and norm.num_sequences == 3
    loss_fn = policy_loss_fn(options, norm)
    whole, whole_metrics = loss_fn(logprobs, None, batch)
    total, metrics = 0.0, {}
    for rows in ([0, 3], [1], [2]):
        mb = batch.select(rows)
        loss, m = loss_fn(logprobs[rows][:, : mb.input_ids.shape[1]], None, mb)
        total += loss.item()
        metrics = {k: metrics.get(k, 0.0) + v.item() for k, v in m.items()}
    assert total == pytest.approx(whole.item(), abs=1e-6)
    assert metrics == pytest.approx({k: v.item() for k, v in whole_metrics.items()}, abs=1e-6)
    # is_cap 1.05 < e^0.1: every token's IS weight is capped
    assert whole_metrics["mismatch/is_capped_fraction"].item() == pytest.approx(1.0)


def test_sft_loss_fn():
    batch, logprobs = _batch()
    norm = compute_loss_normalisers(batch.fields["loss_mask"])
    loss, _ = sft_loss_fn(norm)(logprobs, None, batch)
    expected = -(logprobs * batch.fields["loss_mask"]).sum() / 8
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
