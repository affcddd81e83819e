"""Real Ray actors forming a real gloo world."""

import pytest


class _AllReduceWorker:
    def __init__(self, offset):
        import torch.distributed as dist

        dist.init_process_group("gloo")
        self.offset = offset

    def reduce(self, value):
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value + self.offset + dist.get_rank())])
        dist.all_reduce(t)
        return dist.get_rank(), t.item()


@pytest.mark.distributed
def test_ray_actors_form_one_gloo_world(ray_session):
    from megarl.trainer.worker_group import RayWorkerGroup

    group = RayWorkerGroup(_AllReduceWorker, world_size=2, args=(10,), num_cpus_per_rank=0.5, timeout_s=180)
    try:
        # (1+10+0) + (1+10+1) = 23 on both ranks
        assert group.call_all("reduce", 1) == [(0, 23.0), (1, 23.0)]
    finally:
        group.shutdown()


def _torchrun_rank(world_size):
    """What `run()` does under torchrun: rank 0 drives the group, the others follow its calls."""
    import torch.distributed as dist

    from megarl.trainer.worker_group import TorchrunWorkerGroup, follow_rank0, launched_by_torchrun

    assert launched_by_torchrun()
    dist.init_process_group("gloo")
    if dist.get_rank() != 0:
        follow_rank0()
        return "followed"
    group = TorchrunWorkerGroup(_PreInitWorker, world_size, args=(10,))
    out = [group.call_all("reduce", 1), group.call_rank0("reduce", 2)]
    group.shutdown()
    return out


class _PreInitWorker(_AllReduceWorker):
    """The process group already exists under torchrun."""

    def __init__(self, offset):
        self.offset = offset


@pytest.mark.distributed
def test_torchrun_ranks_follow_rank0_calls():
    from megarl.testing.distributed import run_on_ranks

    results = run_on_ranks(_torchrun_rank, 3, args=(3,), env={"TORCHELASTIC_RUN_ID": "test"}, timeout=120)
    # reduce(1): (1+10+0)+(1+10+1)+(1+10+2) = 36; reduce(2): 39. Other ranks' results stay local.
    assert results[0] == [[(0, 36.0), None, None], (0, 39.0)]
    assert results[1:] == ["followed", "followed"]
