"""A group of Ray actors forming one torch.distributed world (the Megatron training ranks).

Each actor gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
before the worker object is constructed, so the worker initialises torch.distributed and Megatron
exactly as it would under torchrun. Rank 0's node address and a free port on it form the rendezvous.

Workers are called through typed proxies, the same for both groups:

    group.all.save_checkpoint(path)                          # every rank; results by rank
    group.rank0.compute_logprobs(batch, Model.ACTOR, plan)   # every rank (collectives); rank 0's result

An attribute the worker class does not define raises AttributeError listing its methods before
anything is sent. Arguments other than small constants go into the Ray object store once per call
and every rank receives the same reference (Ray resolves top-level ObjectRef arguments), so a global
batch is serialised once, not once per rank.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import ray


class WorkerCalls:
    """`group.all` / `group.rank0`: attribute access checks the worker class has the method and
    returns a function that runs it on every rank (results by rank, or rank 0's)."""

    def __init__(self, group, worker_cls, *, rank0_only: bool):
        self._group, self._worker_cls, self._rank0_only = group, worker_cls, rank0_only

    def __getattr__(self, method: str):
        if method.startswith("_") or not callable(getattr(self._worker_cls, method, None)):
            raise AttributeError(f"{self._worker_cls.__name__} has no method {method!r}; its methods: "
                                 f"{', '.join(worker_methods(self._worker_cls))}")

        def call(*args, **kwargs):
            results = self._group._call_every_rank(method, args, kwargs)
            return results[0] if self._rank0_only else results

        call.__name__ = call.__qualname__ = method
        call.__doc__ = getattr(self._worker_cls, method).__doc__
        return call

    def __dir__(self):
        return worker_methods(self._worker_cls)


def worker_methods(worker_cls) -> list[str]:
    return sorted(n for n in dir(worker_cls) if not n.startswith("_") and callable(getattr(worker_cls, n)))


class _TypedCalls:
    """The `all` / `rank0` proxies of a group holding `self.worker_cls`."""

    @property
    def all(self) -> WorkerCalls:
        return WorkerCalls(self, self.worker_cls, rank0_only=False)

    @property
    def rank0(self) -> WorkerCalls:
        return WorkerCalls(self, self.worker_cls, rank0_only=True)


# Arguments sent inline (cheap to pickle per rank); anything else goes through the object store once.
_INLINE_TYPES = (type(None), bool, int, float, str, bytes, Enum)


def _is_inline(value) -> bool:
    return isinstance(value, _INLINE_TYPES) and (not isinstance(value, (str, bytes)) or len(value) < 4096)


@ray.remote
class _RankHost:
    """Hosts one rank's worker object; methods are called by name through `call`."""

    def __init__(self, env: dict[str, str]):
        import os

        os.environ.update(env)
        self.worker = None

    def address(self) -> tuple[str, int]:
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def placement(self) -> tuple[str, str | None]:
        """(node id, this actor's device index among its visible GPUs, or None without a GPU)."""
        import os

        runtime = ray.get_runtime_context()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if not gpu_ids:
            return runtime.get_node_id(), None
        # Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPUs, so the index is 0 there; with
        # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES the actor sees the node's GPUs and it is the id's position.
        index = visible.index(gpu_ids[0]) if gpu_ids[0] in visible else (0 if not visible else None)
        if index is None:
            raise RuntimeError(f"Ray assigned GPU {gpu_ids[0]} but CUDA_VISIBLE_DEVICES is {visible}")
        return runtime.get_node_id(), str(index)

    def construct(self, worker_cls, env: dict[str, str], args, kwargs) -> None:
        import os

        os.environ.update(env)
        import torch

        from megarl.platform.device import process_plan

        threads = process_plan().torch_threads(int(env["WORLD_SIZE"]))
        if threads:  # CPU ranks share this machine's cores
            torch.set_num_threads(threads)
        self.worker = worker_cls(*args, **kwargs)

    def call(self, method: str, *args, **kwargs) -> Any:
        # args / kwargs are top-level remote arguments: Ray has already resolved ObjectRefs among them
        return getattr(self.worker, method)(*args, **kwargs)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayWorkerGroup(_TypedCalls):
    """`world_size` actors, each holding `worker_cls(*args, **kwargs)` as one torch.distributed rank."""

    def __init__(self, worker_cls, world_size: int, args=(), kwargs=None, num_cpus_per_rank: float = 1,
                 num_gpus_per_rank: float = 0, env: dict[str, str] | None = None, timeout_s: float = 900):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.worker_cls = worker_cls
        self.world_size = world_size
        self.timeout_s = timeout_s
        bundle = {"CPU": num_cpus_per_rank, **({"GPU": num_gpus_per_rank} if num_gpus_per_rank else {})}
        self.placement_group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
        ray.get(self.placement_group.ready(), timeout=timeout_s)
        self.hosts = [
            _RankHost.options(
                num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=r),
            ).remote(env or {})
            for r in range(world_size)
        ]
        master_addr, master_port = ray.get(self.hosts[0].address.remote(), timeout=timeout_s)
        placements = ray.get([h.placement.remote() for h in self.hosts], timeout=timeout_s)
        rank_envs = []
        for r, (local_rank, local_world) in enumerate(node_local_ranks([node for node, _ in placements])):
            env_r = dict(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                         LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            if placements[r][1] is not None:
                env_r["MEGARL_DEVICE_INDEX"] = placements[r][1]  # what init_distributed passes to set_device
            rank_envs.append(env_r)
        self._get([h.construct.remote(worker_cls, e, tuple(args), kwargs or {}) for h, e in zip(self.hosts, rank_envs)])

    def _call_every_rank(self, method: str, args: tuple, kwargs: dict) -> list[Any]:
        """worker.method on every rank (they usually run collectives together); results by rank."""
        args = [a if _is_inline(a) else ray.put(a) for a in args]
        kwargs = {k: v if _is_inline(v) else ray.put(v) for k, v in kwargs.items()}
        return self._get([h.call.remote(method, *args, **kwargs) for h in self.hosts])

    def _get(self, refs):
        return ray.get(refs, timeout=self.timeout_s)

    def shutdown(self) -> None:
        for host in self.hosts:
            ray.kill(host)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.placement_group)


def node_local_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """Per global rank: (LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun defines them — the rank's index
    among the group's ranks on its node (in global rank order) and how many ranks that node has."""
    seen: dict[str, int] = {}
    local = []
    for node in node_ids:
        local.append(seen.get(node, 0))
        seen[node] = local[-1] + 1
    return [(index, seen[node]) for index, node in zip(local, node_ids)]


def launched_by_torchrun() -> bool:
    """True in a process torchrun started (it sets TORCHELASTIC_RUN_ID besides RANK/WORLD_SIZE)."""
    import os

    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


class TorchrunWorkerGroup(_TypedCalls):
    """The same interface when the training ranks are torchrun's processes: rank 0 runs the loop and
    calls workers through `all` / `rank0`; every other rank sits in `follow_rank0()`, receiving each call over a gloo
    control group and running it on its own worker, so all ranks enter the same collectives.

    Ray actor handles (rollout engines) never leave rank 0: the other ranks get None in their place.
    """

    def __init__(self, worker_cls, world_size: int, args=(), kwargs=None, **_ignored):
        import torch.distributed as dist

        self.worker_cls = worker_cls
        self.world_size = world_size
        self.control = _control_group()
        if dist.get_world_size() != world_size:
            raise ValueError(f"torchrun started {dist.get_world_size()} ranks but the config needs {world_size} "
                             "training ranks: set --nproc-per-node / --nnodes to match trainer.nnodes × gpus_per_node")
        self._broadcast(("__construct__", worker_cls, args, kwargs or {}))
        self.worker = worker_cls(*args, **(kwargs or {}))

    def _broadcast(self, call) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([_strip_actor_handles(call)], src=0, group=self.control)

    def _call_every_rank(self, method: str, args: tuple, kwargs: dict) -> list[Any]:
        self._broadcast((method, args, kwargs))  # one pickle, broadcast to every follower
        return [getattr(self.worker, method)(*args, **kwargs)] + [None] * (self.world_size - 1)

    def shutdown(self) -> None:
        self._broadcast(("__stop__", (), {}))


def follow_rank0() -> None:
    """Ranks > 0 under torchrun: construct the worker and run every call rank 0 makes, until stop."""
    import torch.distributed as dist

    control, worker = _control_group(), None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        method, *rest = box[0]
        if method == "__stop__":
            return
        if method == "__construct__":
            worker_cls, args, kwargs = rest
            worker = worker_cls(*args, **kwargs)
            continue
        args, kwargs = rest
        getattr(worker, method)(*args, **kwargs)


_CONTROL = None


def _control_group():
    """A gloo group for the control plane (pickled calls), also when training runs on NCCL."""
    global _CONTROL
    if _CONTROL is None:
        import torch.distributed as dist

        _CONTROL = dist.new_group(backend="gloo")
    return _CONTROL


def _strip_actor_handles(obj):
    if isinstance(obj, ray.actor.ActorHandle):
        return None
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip_actor_handles(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _strip_actor_handles(v) for k, v in obj.items()}
    return obj
