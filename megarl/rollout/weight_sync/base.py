"""The weight-push interface: buckets of HF-named tensors, one transport per module.

A transport has two halves:
- the sender (`WeightTransport` instance, in each trainer process that sends — one per pipeline
  stage, made by `for_sender(stage)`):
  `send_bucket(bucket, engines)` ships one bucket to every engine and returns the Ray refs of the
  engines' load calls;
- the receiver (`receive(payload, device)`, a static method run inside each vLLM worker by
  `MegarlWorkerExtension.megarl_load_weight_bucket`): turns the payload back into
  `[(hf_name, tensor)]` without copying where the transport allows it.

Transports register with `@register_transport("name")`; `get_transport_class(name)` looks them up
and lists the registered names on a miss.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from megarl.utils.registry import Registry

NamedTensors = list[tuple[str, torch.Tensor]]

# The built-in transports register when megarl.rollout.weight_sync is imported, at the first lookup.
TRANSPORTS = Registry("weight transport", builtins="megarl.rollout.weight_sync")


def register_transport(name: str):
    """Decorator: `@register_transport("name")` on a WeightTransport subclass (sets its `name`)."""

    def wrap(cls):
        cls.name = name
        return TRANSPORTS.register(name)(cls)

    return wrap


def get_transport_class(name: str) -> type["WeightTransport"]:
    return TRANSPORTS.get(name)


def registered_transports() -> list[str]:
    return TRANSPORTS.names()


class WeightTransport(ABC):
    """Moves buckets of named tensors from the sending trainer rank into every engine's workers."""

    name: ClassVar[str] = ""

    @classmethod
    def for_sender(cls, sender_index: int, **kwargs) -> "WeightTransport":
        """The transport of sender `sender_index` when several senders (one per pipeline stage)
        push at once; `kwargs` are `WeightPushOptions.transport_kwargs`, the same for all senders.
        Transports with per-sender channels (NCCL groups, ports) derive them from the index."""
        return cls(**kwargs)

    def connect(self, engines: list) -> None:
        """One-time setup with the engines (e.g. a NCCL group). Default: nothing to set up."""

    @abstractmethod
    def send_bucket(self, bucket: NamedTensors, engines: list, *, digest: bool = False) -> list:
        """Deliver `bucket` to every engine actor; return one Ray ref per engine whose value is the
        engine's load report ({"tensors", "bytes", "digest"?})."""

    @staticmethod
    @abstractmethod
    def receive(payload: Any, device: torch.device) -> NamedTensors:
        """Inside a vLLM worker: rebuild the bucket's `[(hf_name, tensor)]` from the payload."""

    def close(self) -> None:
        """Release what `connect` set up."""


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Group a stream of (name, tensor) into lists of at most `bucket_bytes` bytes (a single tensor
    larger than that forms its own bucket). Holds only the current bucket's tensors."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        nbytes = tensor_nbytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 of a bucket's names, dtypes, shapes and raw bytes: the sender and every receiver
    compute it to prove the transport delivered exactly what was sent."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(as_bytes(t).numpy().tobytes())
    return h.hexdigest()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU uint8 view of `t` (copies only if `t` is on a device or not contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype
