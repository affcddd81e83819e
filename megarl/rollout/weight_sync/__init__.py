"""Weight push from the trainer into the rollout engines: one interface, one module per transport.

- `object_store`  Ray object store / shared memory — CPU and the fallback anywhere (tested here)
- `inline`        tensors by reference, engine in the caller's process
- `cuda_ipc`      colocated GPUs, same node (thin; GPU only)
- `nccl`          disaggregated GPUs, NCCL broadcast from the sending trainer rank (thin; GPU only)
"""

from megarl.rollout.weight_sync import cuda_ipc, nccl, object_store  # noqa: F401  (registration)
from megarl.rollout.weight_sync.base import (
    WeightTransport,
    bucket_digest,
    get_transport_class,
    iter_buckets,
    register_transport,
    registered_transports,
)
from megarl.rollout.weight_sync.pusher import (
    VERIFY_MODES,
    LogprobProbe,
    PushStats,
    WeightPusher,
    WeightPushError,
    WeightPushOptions,
    probe_sequences,
)

__all__ = [
    "VERIFY_MODES",
    "LogprobProbe",
    "probe_sequences",
    "PushStats",
    "WeightPushError",
    "WeightPushOptions",
    "WeightPusher",
    "WeightTransport",
    "bucket_digest",
    "get_transport_class",
    "iter_buckets",
    "register_transport",
    "registered_transports",
]
