import pytest

from megarl.testing.distributed import RankFailure, run_on_ranks


def _all_reduce_rank():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), value.item()


def _raise_on_rank_one():
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank 1")
    return "ok"


def _hang():
    import time

    time.sleep(60)


def test_results_in_rank_order_after_a_real_collective():
    assert run_on_ranks(_all_reduce_rank, 2, timeout=120) == [(0, 3.0), (1, 3.0)]


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(RankFailure, match="boom on rank 1"):
        run_on_ranks(_raise_on_rank_one, 2, timeout=120)


def test_a_hanging_world_is_killed_at_the_timeout():
    with pytest.raises(RankFailure, match="timed out"):
        run_on_ranks(_hang, 2, timeout=3)
