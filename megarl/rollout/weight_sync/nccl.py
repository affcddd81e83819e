"""NCCL broadcast transport: disaggregated GPU layout (rollout engines on their own nodes).

Every sender (one per pipeline stage) forms its own NCCL group with each engine: the sender is rank
0, the engine's workers ranks 1..tp (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`, so no
group touches torch.distributed's default group in either process). The group of sender s and
engine e listens on `host:port + s * num_engines + e` (`group_port`): `host` defaults to the sender's
own node address (never 127.0.0.1 — engines sit on other nodes), `port` is the base port.

One group per (sender, engine) pair, not one per sender: engine actors run calls one at a time in
whatever order the senders' calls arrive, so a broadcast spanning two engines could wait on an
engine busy with another sender's broadcast while that sender waits on the first engine (a cycle).
With pair groups a broadcast waits on one engine only, and a sender ships bucket k+1 only after
every engine confirmed bucket k, so no cycle forms.

Per bucket the sender packs one flat device buffer, tells each engine the bucket's layout through a
Ray call (its workers allocate a receive buffer and enter the broadcast), then broadcasts to the
engines in turn. Workers view the received buffer as the bucket's tensors and load them.

Import-safe without CUDA; using it without CUDA raises a clear error.
"""

from __future__ import annotations

import torch

from megarl.rollout.weight_sync.base import NamedTensors, WeightTransport, dtype_from_name, register_transport

# Per vLLM worker process: sender index -> the communicator of that sender's group with this engine.
_WORKER_GROUPS: dict[int, object] = {}


def _require_cuda(what: str) -> None:
    from megarl.platform.device import accelerator_available

    if not accelerator_available():
        raise RuntimeError(f"weight transport 'nccl' needs CUDA and NCCL ({what}); on CPU use 'object_store'")


def group_port(base_port: int, sender_index: int, engine_index: int, num_engines: int) -> int:
    """The TCP port of the rendezvous of sender `sender_index` with engine `engine_index`."""
    if not 0 <= engine_index < num_engines:
        raise ValueError(f"engine_index {engine_index} outside [0, {num_engines})")
    port = base_port + sender_index * num_engines + engine_index
    if not 1024 <= port <= 65535:
        raise ValueError(f"NCCL weight group port {port} (base {base_port}, sender {sender_index}, engine "
                         f"{engine_index}) is outside 1024..65535: choose another base port")
    return port


def sender_host() -> str:
    """This process's node address as other nodes reach it (Ray's view of the node)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray here: the host name's address
        import socket

        return socket.gethostbyname(socket.gethostname())


def init_worker_group(host: str, port: int, rank: int, world_size: int, device: torch.device, sender_index: int = 0) -> None:
    """Run in each vLLM worker (via the engine's collective_rpc) to join sender `sender_index`'s group."""
    _require_cuda("receiver")
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    _WORKER_GROUPS[sender_index] = PyNcclCommunicator(pg, device=device)


@register_transport("nccl")
class NcclBroadcastTransport(WeightTransport):
    def __init__(self, host: str | None = None, port: int = 29555, sender_index: int = 0):
        _require_cuda("sender")
        self.host = host or sender_host()
        self.port, self.sender_index = port, sender_index
        self._comms: list = []

    @classmethod
    def for_sender(cls, sender_index: int, **kwargs) -> "NcclBroadcastTransport":
        return cls(sender_index=sender_index, **kwargs)

    def connect(self, engines: list) -> None:
        import ray
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        sizes = ray.get([engine.num_workers.remote() for engine in engines])
        for index, (engine, size) in enumerate(zip(engines, sizes, strict=True)):
            port = group_port(self.port, self.sender_index, index, len(engines))
            join = engine.join_nccl_weight_group.remote(self.host, port, 1, 1 + size, self.sender_index)
            pg = StatelessProcessGroup.create(host=self.host, port=port, rank=0, world_size=1 + size)
            self._comms.append(PyNcclCommunicator(pg, device=torch.cuda.current_device()))
            ray.get(join)

    def send_bucket(self, bucket: NamedTensors, engines: list, *, digest: bool = False) -> list:
        if len(self._comms) != len(engines):
            raise RuntimeError("NcclBroadcastTransport.connect(engines) must run before the first push")
        nbytes = [t.numel() * t.element_size() for _, t in bucket]
        flat = torch.empty(sum(nbytes), dtype=torch.uint8, device=torch.cuda.current_device())
        offset, meta = 0, []
        for (name, t), n in zip(bucket, nbytes, strict=True):
            flat[offset : offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            meta.append((name, str(t.dtype), tuple(t.shape), offset, n))
            offset += n
        payload = {"meta": meta, "nbytes": int(flat.numel()), "digest": digest, "sender": self.sender_index}
        refs = [engine.load_weight_bucket.remote(self.name, payload) for engine in engines]
        for comm in self._comms:
            comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        return refs

    @staticmethod
    def receive(payload, device: torch.device) -> NamedTensors:
        _require_cuda("receiver")
        comm = _WORKER_GROUPS.get(payload["sender"])
        if comm is None:
            raise RuntimeError(f"this worker has not joined sender {payload['sender']}'s NCCL weight group "
                               "(engine.join_nccl_weight_group)")
        flat = torch.empty(payload["nbytes"], dtype=torch.uint8, device=device)
        comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        return [
            (name, flat[offset : offset + n].view(dtype_from_name(dtype)).reshape(shape))
            for name, dtype, shape, offset, n in payload["meta"]
        ]

    def close(self) -> None:
        self._comms = []
