"""CUDA IPC transport: colocated GPU layout (training and rollout processes share the node's GPUs).

Each sender (one per pipeline stage) packs its bucket into one flat buffer on its own GPU and sends
the buffer's CUDA IPC handle (a few hundred bytes) with that GPU's UUID to the engines. A worker
opens the handle as a zero-copy view of the sender's memory and vLLM's loaders copy from it into
the weights (a local copy when the worker shares the sender's GPU, NVLink/P2P otherwise).

Device indices differ between processes (Ray gives every actor its own CUDA_VISIBLE_DEVICES, so the
sender's `cuda:0` is not the worker's `cuda:0`): the receiver finds the sender's GPU by UUID among
its visible devices and opens the handle there. A worker that cannot see the sender's GPU (another
node, or a GPU outside its CUDA_VISIBLE_DEVICES) gets a clear error: such engines need `nccl`.

The sender keeps the buffer alive until all loads returned (the pusher waits before the next
bucket), then frees it: one bucket beyond the model's own shards.

Import-safe without CUDA; using it without CUDA raises a clear error.
"""

from __future__ import annotations

import torch

from megarl.rollout.weight_sync.base import NamedTensors, WeightTransport, dtype_from_name, register_transport

# torch.multiprocessing.reductions.rebuild_cuda_tensor(tensor_cls, size, stride, offset, storage_cls,
# dtype, storage_device, storage_handle, ...): the position of the device index in its arguments.
_REBUILD_DEVICE_ARG = 6


def _require_cuda(what: str) -> None:
    from megarl.platform.device import accelerator_available

    if not accelerator_available():
        raise RuntimeError(f"weight transport 'cuda_ipc' needs CUDA ({what}); on CPU use 'object_store'")


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index_of(uuid: str, visible_uuids: list[str]) -> int:
    """This process's device index of the GPU `uuid`; a clear error if it is not visible here."""
    if uuid not in visible_uuids:
        raise RuntimeError(f"cuda_ipc: the sender's GPU {uuid} is not visible to this vLLM worker (visible: "
                           f"{visible_uuids}); engines on other nodes or GPUs need weight_sync.transport 'nccl'")
    return visible_uuids.index(uuid)


@register_transport("cuda_ipc")
class CudaIpcTransport(WeightTransport):
    def __init__(self, sender_index: int = 0):
        _require_cuda("sender")
        self.sender_index = sender_index
        self._inflight: torch.Tensor | None = None

    @classmethod
    def for_sender(cls, sender_index: int, **kwargs) -> "CudaIpcTransport":
        return cls(sender_index=sender_index, **kwargs)

    def send_bucket(self, bucket: NamedTensors, engines: list, *, digest: bool = False) -> list:
        from torch.multiprocessing.reductions import reduce_tensor

        device = torch.cuda.current_device()
        nbytes = [t.numel() * t.element_size() for _, t in bucket]
        flat = torch.empty(sum(nbytes), dtype=torch.uint8, device=device)
        offset, meta = 0, []
        for (name, t), n in zip(bucket, nbytes, strict=True):
            flat[offset : offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
            meta.append((name, str(t.dtype), tuple(t.shape), offset, n))
            offset += n
        torch.cuda.current_stream().synchronize()
        self._inflight = flat  # freed when the next bucket replaces it (after the pusher waited)
        payload = {"handle": reduce_tensor(flat), "uuid": device_uuid(device), "meta": meta, "digest": digest,
                   "sender": self.sender_index}
        return [engine.load_weight_bucket.remote(self.name, payload) for engine in engines]

    @staticmethod
    def receive(payload, device: torch.device) -> NamedTensors:
        _require_cuda("receiver")
        rebuild, args = payload["handle"]
        visible = [device_uuid(i) for i in range(torch.cuda.device_count())]
        args = list(args)
        args[_REBUILD_DEVICE_ARG] = local_index_of(payload["uuid"], visible)
        flat = rebuild(*args)
        return [
            (name, flat[offset : offset + n].view(dtype_from_name(dtype)).reshape(shape))
            for name, dtype, shape, offset, n in payload["meta"]
        ]

    def close(self) -> None:
        self._inflight = None
