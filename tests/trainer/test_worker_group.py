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


    def payload_size(self, payload, scale=1):
        import torch.distributed as dist

        return payload.n * scale + dist.get_rank()


class _CountedPayload:
    """Counts how often the driver pickles it (the ranks only unpickle)."""

    pickles = 0

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        type(self).pickles += 1
        return _CountedPayload, (self.n,)


@pytest.mark.distributed
def test_ray_actors_form_one_gloo_world_called_through_typed_proxies(ray_session):
    from megarl.trainer.worker_group import RayWorkerGroup

    group = RayWorkerGroup(_AllReduceWorker, world_size=2, args=(10,), num_cpus_per_rank=0.5, timeout_s=180)
    try:
        # (1+10+0) + (1+10+1) = 23 on both ranks
        assert group.all.reduce(1) == [(0, 23.0), (1, 23.0)]
        assert group.rank0.reduce(2) == (0, 25.0)
        with pytest.raises(AttributeError, match="_AllReduceWorker has no method 'reduc'; its methods: payload_size, reduce"):
            group.all.reduc(1)

        # A large argument is pickled once per call and every rank gets the same object-store reference
        # (passing it to each actor directly, as before, pickles it once per rank).
        payload = _CountedPayload(7)
        _CountedPayload.pickles = 0
        ray_session.get([h.call.remote("payload_size", payload) for h in group.hosts])
        assert _CountedPayload.pickles == 2
        _CountedPayload.pickles = 0
        assert group.all.payload_size(payload, scale=3) == [21, 22]
        assert group.rank0.payload_size(payload=payload) == 7  # keyword arguments too
        assert _CountedPayload.pickles == 2  # 1 per call, not world_size
    finally:
        group.shutdown()


def test_model_names_are_an_enum_and_an_unknown_one_is_an_error():
    from types import SimpleNamespace

    from megarl.trainer.train_worker import MegatronTrainWorker, Model

    worker = SimpleNamespace(actor="actor engine", ref="reference engine")
    assert MegatronTrainWorker._model(worker, Model.ACTOR) == "actor engine"
    assert MegatronTrainWorker._model(worker, Model.REF) == "reference engine"
    with pytest.raises(ValueError, match="unknown model 'reff'; one of: actor, ref"):
        MegatronTrainWorker._model(worker, "reff")
    with pytest.raises(ValueError, match="no reference model on this run"):
        MegatronTrainWorker._model(SimpleNamespace(actor="actor engine", ref=None), Model.REF)


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
    out = [group.all.reduce(1), group.rank0.reduce(2)]
    try:
        group.all.reduc(1)
    except AttributeError as exc:  # raised on rank 0 before anything reaches the followers
        out.append(str(exc))
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
    assert results[0] == [[(0, 36.0), None, None], (0, 39.0),
                          "_PreInitWorker has no method 'reduc'; its methods: payload_size, reduce"]
    assert results[1:] == ["followed", "followed"]
