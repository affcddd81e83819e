"""Batch layouts and micro-batch plans (pure torch, no megatron)."""

import pytest
import torch

from megarl.models.batch import (
    MicroBatch,
    SequenceBatch,
    balanced_partition,
    context_parallel_index,
    plan_micro_batches,
    sequence_alignment,
)

SEQS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]


def make_batch():
    return SequenceBatch.from_sequences(SEQS, loss_mask=[[0, 1, 1], [0, 0, 1, 1, 1], [0, 1], [0, 1, 1, 0]])


def test_from_sequences_and_from_padded_agree():
    batch = make_batch()
    assert batch.input_ids.shape == (4, 5)
    assert batch.lengths.tolist() == [3, 5, 2, 4]
    assert batch.fields["loss_mask"][1].tolist() == [0, 0, 1, 1, 1]
    again = SequenceBatch.from_padded(batch.input_ids, batch.token_mask().long(), loss_mask=batch.fields["loss_mask"])
    assert torch.equal(again.input_ids, batch.input_ids) and torch.equal(again.lengths, batch.lengths)
    sub = batch.select([2, 0])
    assert sub.input_ids.tolist() == [[13, 14, 0], [5, 6, 7]]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="right-padded"):
        SequenceBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="row 0 has 2 values for 3 tokens"):
        SequenceBatch.from_sequences([[1, 2, 3]], loss_mask=[[1, 1]])
    with pytest.raises(ValueError, match="longer than the token budget"):
        plan_micro_batches([3, 40], 1, max_tokens=16)
    with pytest.raises(ValueError, match="cannot feed 4 data-parallel ranks"):
        plan_micro_batches([3, 4], 4, micro_batch_size=1)


def test_balanced_partition_balances_tokens():
    groups = balanced_partition([10, 9, 8, 2, 1, 1], 2)
    totals = [sum([10, 9, 8, 2, 1, 1][i] for i in g) for g in groups]
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert sorted(totals) == [14, 17]  # the best split of these costs


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_plan_by_token_budget(dp):
    lengths = [37, 5, 12, 64, 3, 22, 18, 40, 9, 30, 7, 51]
    plan = plan_micro_batches(lengths, dp, max_tokens=64, align=4)
    seen = sorted(i for rank in plan.assignment for mb in rank for i in mb)
    assert seen == list(range(len(lengths)))
    assert len({len(rank) for rank in plan.assignment}) == 1  # same count on every DP rank
    for rank in plan.assignment:
        for mb in rank:
            assert mb and sum(-(-lengths[i] // 4) * 4 for i in mb) <= 64
    rank_tokens = [sum(lengths[i] for mb in rank for i in mb) for rank in plan.assignment]
    assert max(rank_tokens) - min(rank_tokens) <= max(lengths)


def test_plan_by_count():
    plan = plan_micro_batches([4, 4, 4, 4, 4, 9, 9], 2, micro_batch_size=2)
    assert plan.num_micro_batches == 2
    assert all(len(mb) <= 2 for rank in plan.assignment for mb in rank)


def test_context_parallel_index_is_megatron_load_balanced_split():
    assert context_parallel_index([8], 2, 0).tolist() == [0, 1, 6, 7]
    assert context_parallel_index([8], 2, 1).tolist() == [2, 3, 4, 5]
    # packed: per sequence
    assert context_parallel_index([4, 8], 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert sequence_alignment(cp_size=2, tp_size=2, sequence_parallel=True) == 8


@pytest.mark.parametrize("packed", [False, True])
def test_micro_batch_labels_and_alignment(packed):
    batch = make_batch()
    mb = MicroBatch.build(batch, [1, 2, 0], packed=packed, align=4)
    if packed:
        assert mb.tokens.shape == (1, 8 + 4 + 4)
        assert mb.cu_seqlens.tolist() == [0, 8, 12, 16]
        assert mb.positions[0].tolist() == list(range(8)) + list(range(4)) + list(range(4))
    else:
        assert mb.tokens.shape == (3, 8)
    # next-token targets in layout order, mapped back to token positions, give the tokens themselves
    back = mb.aligned(mb.labels.float())
    expected = mb.sequences.input_ids.float() * (torch.arange(5)[None, :] >= 1) * mb.sequences.token_mask()
    assert torch.equal(back, expected)
    assert mb.padding.sum().item() == mb.tokens.numel() - batch.select([1, 2, 0]).num_tokens
    assert not mb.padding.view(-1)[mb.source_index[mb.source_valid]].any()
    # CP pieces cover the layout exactly once
    idx = torch.cat([mb.cp_index(2, r) for r in range(2)])
    assert sorted(idx.tolist()) == list(range(mb.tokens.size(1)))
    local = mb.model_inputs(2, 1)
    assert torch.equal(local["input_ids"], mb.tokens[:, mb.cp_index(2, 1)])


def test_group_size_keeps_pairs_together_in_order():
    from megarl.models.batch import plan_micro_batches

    lengths = [5, 9, 3, 3, 8, 1, 2, 2]  # four pairs
    plan = plan_micro_batches(lengths, 2, micro_batch_size=1, group_size=2)
    seen = sorted(i for rank in plan.assignment for mb in rank for i in mb)
    assert seen == list(range(8))
    for rank in plan.assignment:
        assert len(rank) == 2
        for mb in rank:
            assert len(mb) == 2 and mb[0] % 2 == 0 and mb[1] == mb[0] + 1
    budget = plan_micro_batches(lengths, 1, max_tokens=14, group_size=2)
    for mb in budget.assignment[0]:
        assert sum(lengths[i] for i in mb) <= 14
        assert all(mb[k + 1] == mb[k] + 1 for k in range(0, len(mb), 2))
