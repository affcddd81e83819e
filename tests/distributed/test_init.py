"""init_distributed / reset_model_parallel in a 2-rank gloo world started like torchrun."""

from __future__ import annotations

import pytest

from megarl.distributed import LayoutError, ParallelLayout
from megarl.testing.distributed import run_on_ranks


def _init_world():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megarl.distributed.init import current_layout, init_distributed, reset_model_parallel

    out = {}
    tp2 = init_distributed(ParallelLayout(tp=2), seed=7)
    out["tp2"] = (tp2.backend, tp2.world_size, tp2.tp_rank, tp2.data_parallel_size, tp2.rank)
    # megatron's per-TP-rank RNG stream differs between TP ranks, the default stream does not
    with get_cuda_rng_tracker().fork():
        out["tp_stream"] = torch.rand(1).item()
    out["default_stream"] = torch.rand(1).item()
    out["again_is_noop"] = init_distributed(ParallelLayout(tp=2), seed=7).tp_rank == tp2.tp_rank
    try:
        init_distributed(ParallelLayout(pp=2))
        out["switch_without_reset"] = None
    except LayoutError as exc:
        out["switch_without_reset"] = str(exc)
    try:
        init_distributed(ParallelLayout(tp=4))  # checked before touching megatron's state
        out["bad_world"] = None
    except LayoutError as exc:
        out["bad_world"] = str(exc)
    reset_model_parallel()
    out["after_reset"] = (mpu.model_parallel_is_initialized(), current_layout(), dist.is_initialized())
    pp2 = init_distributed(ParallelLayout(pp=2))
    out["pp2"] = (pp2.pp_rank, pp2.tp_rank, mpu.is_pipeline_last_stage())
    reset_model_parallel()
    ep2 = init_distributed(ParallelLayout(ep=2))
    out["ep2"] = (ep2.ep_rank, ep2.data_parallel_size, mpu.get_expert_data_parallel_world_size())
    reset_model_parallel()
    return out


@pytest.mark.timeout(450)
@pytest.mark.distributed
def test_init_reset_and_switch_layouts():
    ranks = run_on_ranks(_init_world, world_size=2, timeout=400)
    for rank, out in enumerate(ranks):
        assert out["tp2"] == ("gloo", 2, rank, 1, rank)
        assert out["again_is_noop"]
        assert "call reset_model_parallel() before switching" in out["switch_without_reset"]
        assert "world size 2 is not divisible by TP x PP x CP = 4 x 1 x 1" in out["bad_world"]
        assert out["after_reset"] == (False, None, True)  # megatron state gone, process group kept
        assert out["pp2"] == (rank, 0, rank == 1)
        assert out["ep2"] == (rank, 2, 1)
    assert ranks[0]["tp_stream"] != ranks[1]["tp_stream"]
    assert ranks[0]["default_stream"] == ranks[1]["default_stream"]


def test_missing_launcher_environment(monkeypatch):
    import torch.distributed as dist

    from megarl.distributed.init import init_distributed

    if dist.is_initialized():
        pytest.skip("this test process already has a process group")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"launch with torchrun, or set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT"):
        init_distributed(ParallelLayout())


def test_bad_layout_rejected_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    from megarl.distributed.init import init_distributed

    if dist.is_initialized():
        pytest.skip("this test process already has a process group")
    monkeypatch.setenv("WORLD_SIZE", "6")
    for name, value in (("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(LayoutError, match="world size 6 is not divisible by TP x PP x CP = 4"):
        init_distributed(ParallelLayout(tp=4))
    assert not dist.is_initialized()
