"""The modelled weight sync of the 235B recipe (one sender per pipeline stage), by hand.

Bytes per stage follow from the published config; the real tiny push checks the same function at
PP2×EP2 and TP2×PP2 (tests/rollout/test_stage_export.py)."""

import pytest

from megarl.planner import format_plan
from megarl.planner.sync_model import PEER_FIGURES, SyncAssumptions, plan_sync, stage_sync_bytes
from tests.planner.test_plan import _plan_235b


def test_235b_sync_bytes_per_sender_by_hand():
    cfg, plan = _plan_235b()
    m, par, sync = plan.stats, plan.parallel, plan.sync
    assert sync.total_bytes == m.total_params * 2  # bf16, every HF tensor shipped once
    # stage 1: 12 MoE layers; each layer: attention + norms + router + 128 experts
    layer = m.layer_dense_params(12) + m.layer_expert_params(12)
    assert sync.stages[1].hf_bytes == 12 * layer * 2
    assert sync.stages[0].hf_bytes == (12 * layer + m.embedding_params) * 2
    assert sync.stages[7].hf_bytes == (10 * layer + m.final_norm_params + m.lm_head_params) * 2
    # the sender of stage 1 receives 3/4 of its TP-sharded attention (TP4) and 7/8 of its experts (EP8)
    received = 12 * (m.attention_linear_params * 3 // 4 + m.layer_expert_params(12) * 7 // 8) * 2
    assert sync.stages[1].received_bytes == received
    assert all(s.received_bytes <= s.hf_bytes for s in sync.stages)  # never another stage's bytes
    # 1024 MiB buckets of local bytes, one TP and one EP gather each
    local = (12 * m.layer_dense_params(12) // 4 + 12 * m.layer_expert_params(12) // 8) * 2
    assert sync.stages[1].gathers == 2 * -(-local // 2**30)


def test_235b_sync_time_is_the_slower_of_senders_and_engine_ingest():
    _, plan = _plan_235b()
    sync, a = plan.sync, SyncAssumptions()
    total = sync.total_bytes
    assert sync.engine_ingest_seconds == pytest.approx(total / 40e9 + total / 100e9)
    s1 = sync.stages[1]
    gather = 12 * 2 * (plan.stats.attention_linear_params * 3 // 4) / 150e9 + \
        12 * 2 * (plan.stats.layer_expert_params(12) * 7 // 8) / 150e9
    assert s1.seconds == pytest.approx(gather + 8 * s1.hf_bytes / 40e9 + s1.hf_bytes / 100e9)
    assert sync.seconds == pytest.approx(max(max(s.seconds for s in sync.stages), sync.engine_ingest_seconds)
                                         + a.finish_seconds)
    assert 15 < sync.seconds < min(t for _, _, t in PEER_FIGURES)  # at least as good as the peers' figures
    # colocated -> cuda_ipc cannot reach engine workers on other nodes: modelled (and said) as nccl
    assert sync.transport == "nccl" and "cuda_ipc" in sync.notes[0]


def test_dry_run_prints_sync_time_bytes_per_sender_and_peers():
    cfg, plan = _plan_235b()
    text = format_plan(plan, cfg)
    assert f"470.2 GB per push, modelled {plan.sync.seconds:.1f} s" in text
    assert "stage layers  sender GB  received GB  gathers  sender s" in text
    assert "verl checkpoint engine Qwen3-235B-A22B 23.7 s" in text


def test_single_stage_single_rank_receives_nothing():
    _, plan = _plan_235b()
    from megarl.planner.memory import ParallelSizes

    par = ParallelSizes(tp=1, pp=1, ep=1, etp=1, cp=1, vpp=None, sequence_parallel=False, train_gpus=1)
    [(hf, received)] = stage_sync_bytes(plan.stats, par, bytes_per_param=2)
    assert hf == plan.stats.total_params * 2 and received == 0
    one = plan_sync(plan.stats, par, bytes_per_param=2, rollout_tp=8, num_engines=1, gpus_per_node=8,
                    bucket_bytes=2**30, transport="cuda_ipc")
    assert one.transport == "cuda_ipc" and not one.notes
