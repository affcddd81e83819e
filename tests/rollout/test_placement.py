"""Placement and load balancing: pure functions plus real (CPU) Ray placement groups."""

import pytest

from megarl.rollout import RolloutPlacement, RolloutRequest, SamplingOptions
from megarl.rollout.engine_group import balance
from megarl.rollout.placement import actor_options, create_engine_slots


def test_balance_spreads_by_estimated_tokens_and_keeps_order():
    requests = [RolloutRequest(prompt_token_ids=[1] * n) for n in (100, 10, 10, 10, 90)]
    sampling = SamplingOptions(n=2, max_tokens=50)
    assignment = balance(requests, list(range(5)), sampling, 2)
    assert assignment == [[0, 4], [1, 2, 3]] or assignment == [[0, 3], [1, 2, 4]]
    assert all(a == sorted(a) for a in assignment)
    assert sorted(i for a in assignment for i in a) == list(range(5))
    # a per-request sampling override counts too
    heavy = [RolloutRequest(prompt_token_ids=[1], sampling=SamplingOptions(n=16, max_tokens=100))] + [RolloutRequest(prompt_token_ids=[1])] * 3
    assert balance(heavy, [0, 1, 2, 3], SamplingOptions(max_tokens=10), 2) == [[0], [1, 2, 3]]


def test_placement_options_are_validated():
    with pytest.raises(ValueError, match="disaggregated|colocated"):
        RolloutPlacement(mode="mixed")
    with pytest.raises(ValueError, match="num_engines"):
        RolloutPlacement(num_engines=0)


def test_cpu_slots_and_gpu_actor_options(ray_cluster):
    from ray.util import remove_placement_group

    slots = create_engine_slots(RolloutPlacement(num_engines=2, tensor_parallel_size=1, cpus_per_bundle=0.01), timeout_s=60)
    try:
        # disaggregated: one placement group per engine, the engine on its bundle 0
        assert [s.bundle_indices for s in slots] == [(0,), (0,)]
        assert slots[0].placement_group.id != slots[1].placement_group.id
        assert slots[0].placement_group.bundle_specs == [{"CPU": 0.01}]
        cpu = actor_options(slots[0], use_gpu=False, tensor_parallel_size=1, env={"A": "1"}, cpus=0.01)
        assert cpu["num_gpus"] == 0 and cpu["num_cpus"] == 0.01 and "VLLM_RAY_BUNDLE_INDICES" not in cpu["runtime_env"]["env_vars"]
        # What a TP16 engine on GPUs gets (options only; this machine has no GPU): the actor takes no
        # GPU, vLLM's Ray workers use bundles 16..31 of a shared group.
        from megarl.rollout.placement import EngineSlot

        tp16 = actor_options(EngineSlot(slots[1].placement_group, tuple(range(16, 32))), use_gpu=True, tensor_parallel_size=16, env={})
        assert tp16["num_gpus"] == 0 and tp16["num_cpus"] == 0
        assert tp16["runtime_env"]["env_vars"]["VLLM_RAY_BUNDLE_INDICES"] == ",".join(map(str, range(16, 32)))
        assert tp16["scheduling_strategy"].placement_group_bundle_index == 16
        assert tp16["scheduling_strategy"].placement_group_capture_child_tasks
    finally:
        for slot in slots:
            remove_placement_group(slot.placement_group)
    with pytest.raises(ValueError, match="on CPU use disaggregated"):
        create_engine_slots(RolloutPlacement(mode="colocated"), timeout_s=10)
