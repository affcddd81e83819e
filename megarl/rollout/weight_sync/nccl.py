"""NCCL broadcast transport: disaggregated GPU layout (rollout engines on their own nodes).

`connect(engines)` forms one NCCL group: the sending trainer rank is rank 0, the workers of engine
e take ranks 1 + e*tp ... (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`, so the group does
not touch torch.distributed's default group in either process). Per bucket the sender packs one flat
device buffer, tells every engine the bucket's layout through a Ray call (which makes its workers
allocate a receive buffer and enter the broadcast), then broadcasts. Workers view the received
buffer as the bucket's tensors and load them. One bucket in flight.

Import-safe without CUDA; using it without CUDA raises a clear error.
"""

from __future__ import annotations

import torch

from megarl.rollout.weight_sync.base import NamedTensors, WeightTransport, dtype_from_name, register_transport

# Per worker process: the communicator made by `megarl_init_nccl_group` (see worker extension use below).
_WORKER_GROUP = {}


def _require_cuda(what: str) -> None:
    from megarl.platform.device import accelerator_available

    if not accelerator_available():
        raise RuntimeError(f"weight transport 'nccl' needs CUDA and NCCL ({what}); on CPU use 'object_store'")


def init_worker_group(host: str, port: int, rank: int, world_size: int, device: torch.device) -> None:
    """Run in each vLLM worker (via the engine's collective_rpc) to join the broadcast group."""
    _require_cuda("receiver")
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    _WORKER_GROUP["comm"] = PyNcclCommunicator(pg, device=device)


@register_transport("nccl")
class NcclBroadcastTransport(WeightTransport):
    def __init__(self, host: str | None = None, port: int = 29555):
        """`host`:`port` is where the sender (rank 0 of the group) listens for the engines' workers;
        host None = this node's IP as Ray sees it (reachable from the other nodes, unlike 127.0.0.1).
        Set from rollout.weight_sync.nccl_host / nccl_port."""
        _require_cuda("sender")
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self.host, self.port = host, port
        self._comm = None

    def connect(self, engines: list) -> None:
        import ray
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        sizes = ray.get([engine.num_workers.remote() for engine in engines])
        world_size = 1 + sum(sizes)
        joins, first_rank = [], 1
        for engine, size in zip(engines, sizes, strict=True):
            joins.append(engine.join_nccl_weight_group.remote(self.host, self.port, first_rank, world_size))
            first_rank += size
        pg = StatelessProcessGroup.create(host=self.host, port=self.port, rank=0, world_size=world_size)
        self._comm = PyNcclCommunicator(pg, device=torch.cuda.current_device())
        ray.get(joins)

    def send_bucket(self, bucket: NamedTensors, engines: list, *, digest: bool = False) -> list:
        if self._comm is None:
            raise RuntimeError("NcclBroadcastTransport.connect(engines) must run before the first push")
        nbytes = [t.numel() * t.element_size() for _, t in bucket]
        flat = torch.empty(sum(nbytes), dtype=torch.uint8, device=torch.cuda.current_device())
        offset, meta = 0, []
        for (name, t), n in zip(bucket, nbytes, strict=True):
            flat[offset : offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            meta.append((name, str(t.dtype), tuple(t.shape), offset, n))
            offset += n
        payload = {"meta": meta, "nbytes": int(flat.numel()), "digest": digest}
        refs = [engine.load_weight_bucket.remote(self.name, payload) for engine in engines]
        self._comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        return refs

    @staticmethod
    def receive(payload, device: torch.device) -> NamedTensors:
        _require_cuda("receiver")
        comm = _WORKER_GROUP.get("comm")
        if comm is None:
            raise RuntimeError("this worker has not joined the NCCL weight group (engine.join_nccl_weight_group)")
        flat = torch.empty(payload["nbytes"], dtype=torch.uint8, device=device)
        comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        return [
            (name, flat[offset : offset + n].view(dtype_from_name(dtype)).reshape(shape))
            for name, dtype, shape, offset, n in payload["meta"]
        ]

    def close(self) -> None:
        self._comm = None
