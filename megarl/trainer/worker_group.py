"""A group of Ray actors forming one torch.distributed world (the Megatron training ranks).

Each actor gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
before the worker object is constructed, so the worker initialises torch.distributed and Megatron
exactly as it would under torchrun. Rank 0's node address and a free port on it form the rendezvous.
"""

from __future__ import annotations

from typing import Any

import ray


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

    def construct(self, worker_cls, env: dict[str, str], args, kwargs) -> None:
        import os

        os.environ.update(env)
        import torch

        world = int(env["WORLD_SIZE"])
        if not torch.cuda.is_available():  # ranks share this machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        self.worker = worker_cls(*args, **kwargs)

    def call(self, method: str, args, kwargs) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayWorkerGroup:
    """`world_size` actors, each holding `worker_cls(*args, **kwargs)` as one torch.distributed rank."""

    def __init__(self, worker_cls, world_size: int, args=(), kwargs=None, num_cpus_per_rank: float = 1,
                 num_gpus_per_rank: float = 0, env: dict[str, str] | None = None, timeout_s: float = 900):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
        rank_envs = [
            dict(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world_size),
                 MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            for r in range(world_size)
        ]
        self._get([h.construct.remote(worker_cls, e, tuple(args), kwargs or {}) for h, e in zip(self.hosts, rank_envs)])

    def call_all(self, method: str, *args, **kwargs) -> list[Any]:
        """Call worker.method on every rank (they usually run collectives together); results by rank."""
        return self._get([h.call.remote(method, args, kwargs) for h in self.hosts])

    def call_rank0(self, method: str, *args, **kwargs) -> Any:
        """Call on every rank (collectives need all), return rank 0's result."""
        return self.call_all(method, *args, **kwargs)[0]

    def _get(self, refs):
        return ray.get(refs, timeout=self.timeout_s)

    def shutdown(self) -> None:
        for host in self.hosts:
            ray.kill(host)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.placement_group)
