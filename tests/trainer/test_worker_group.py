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
