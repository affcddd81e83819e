"""Ray object store transport (CPU, and the fallback anywhere Ray runs).

The sender `ray.put`s the bucket once — each tensor as a uint8 numpy view, which Ray writes straight
into shared memory (plasma) with one copy — and passes the same object ref to every engine. Engines on
the sender's node map that memory without copying (`ray.get` of numpy arrays is zero-copy); engines on
other nodes get it pulled by Ray. vLLM's loaders then copy from the shared buffer into the weights.
The object is freed when the sender and all engines have dropped the ref (after the bucket's loads).
"""

from __future__ import annotations

import warnings

import torch

from megarl.rollout.weight_sync.base import (
    NamedTensors,
    WeightTransport,
    as_bytes,
    bucket_digest,
    dtype_from_name,
    register_transport,
)


@register_transport("object_store")
class ObjectStoreTransport(WeightTransport):
    def send_bucket(self, bucket: NamedTensors, engines: list, *, digest: bool = False) -> list:
        import ray

        meta = [(name, str(t.dtype), tuple(t.shape)) for name, t in bucket]
        ref = ray.put([as_bytes(t).numpy() for _, t in bucket])
        # The ref sits inside a dict so Ray passes it through instead of resolving it in the engine
        # actor: the vLLM worker that loads the bucket (possibly another process) resolves it.
        payload = {"ref": ref, "meta": meta, "digest": digest}
        return [engine.load_weight_bucket.remote(self.name, payload) for engine in engines]

    @staticmethod
    def receive(payload, device: torch.device) -> NamedTensors:
        import ray

        arrays = ray.get(payload["ref"])
        named = []
        with warnings.catch_warnings():
            # Plasma buffers are read-only; vLLM's loaders only read (copy) from them.
            warnings.simplefilter("ignore", UserWarning)
            for (name, dtype, shape), array in zip(payload["meta"], arrays, strict=True):
                named.append((name, torch.from_numpy(array).view(dtype_from_name(dtype)).reshape(shape)))
        return named


@register_transport("inline")
class InlineTransport(WeightTransport):
    """Tensors passed by reference: only for an engine in the caller's own process (unit tests, the
    colocated `external_launcher` layout). Through a Ray actor call the bucket is pickled instead."""

    def send_bucket(self, bucket: NamedTensors, engines: list, *, digest: bool = False) -> list:
        payload = {"tensors": list(bucket), "digest": digest}
        return [engine.load_weight_bucket.remote(self.name, payload) for engine in engines]

    @staticmethod
    def receive(payload, device: torch.device) -> NamedTensors:
        return list(payload["tensors"])


__all__ = ["ObjectStoreTransport", "InlineTransport", "bucket_digest"]
