"""CUDA IPC transport: colocated GPU layout (training and rollout processes share the node's GPUs).

The sender packs the bucket into one flat device buffer and sends its CUDA IPC handle (a few hundred
bytes) to the engines; every worker on the same node opens the handle (zero-copy view of the
sender's memory, on the sender's GPU) and vLLM's loaders copy from it into the weights (NVLink/P2P
if the worker sits on another GPU). The sender keeps the buffer alive until all loads returned, then
frees it: one bucket beyond the model's own shards. Same-node only — use `nccl` across nodes.

Import-safe without CUDA; using it without CUDA raises a clear error.
"""

from __future__ import annotations

import torch

from megarl.rollout.weight_sync.base import NamedTensors, WeightTransport, dtype_from_name, register_transport


def _require_cuda(what: str) -> None:
    from megarl.platform.device import accelerator_available

    if not accelerator_available():
        raise RuntimeError(f"weight transport 'cuda_ipc' needs CUDA ({what}); on CPU use 'object_store'")


@register_transport("cuda_ipc")
class CudaIpcTransport(WeightTransport):
    def __init__(self):
        _require_cuda("sender")
        self._inflight: torch.Tensor | None = None

    def send_bucket(self, bucket: NamedTensors, engines: list, *, digest: bool = False) -> list:
        from torch.multiprocessing.reductions import reduce_tensor

        nbytes = [t.numel() * t.element_size() for _, t in bucket]
        flat = torch.empty(sum(nbytes), dtype=torch.uint8, device=torch.cuda.current_device())
        offset, meta = 0, []
        for (name, t), n in zip(bucket, nbytes, strict=True):
            flat[offset : offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
            meta.append((name, str(t.dtype), tuple(t.shape), offset, n))
            offset += n
        torch.cuda.current_stream().synchronize()
        self._inflight = flat  # freed when the next bucket replaces it (after the pusher waited)
        payload = {"handle": reduce_tensor(flat), "meta": meta, "digest": digest}
        return [engine.load_weight_bucket.remote(self.name, payload) for engine in engines]

    @staticmethod
    def receive(payload, device: torch.device) -> NamedTensors:
        _require_cuda("receiver")
        rebuild, args = payload["handle"]
        flat = rebuild(*args)
        return [
            (name, flat[offset : offset + n].view(dtype_from_name(dtype)).reshape(shape))
            for name, dtype, shape, offset, n in payload["meta"]
        ]

    def close(self) -> None:
        self._inflight = None
