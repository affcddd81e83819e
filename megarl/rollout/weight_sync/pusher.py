"""Push trainer weights (any iterator of (hf_name, tensor)) into every rollout engine.

    pusher = WeightPusher(group.engines, WeightPushOptions(transport="object_store", bucket_mb=512))
    stats = pusher.push(export_hf_weights(handle), is_sender=(rank == 0))

Every training rank must iterate the exporter (it runs collectives); only the sender ships buckets.
At most one bucket is materialised beyond the tensors the iterator yields (by default): the sender
waits until every engine has loaded bucket k before it builds bucket k+1. `max_inflight_buckets=2`
trades a second bucket of memory for overlapping the sender's copy with the engines' loads.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Iterable

import torch

from megarl.rollout.weight_sync.base import bucket_digest, get_transport_class, iter_buckets, tensor_nbytes


class WeightPushError(RuntimeError):
    """A push failed or delivered something other than what was sent; the engines' weights are not
    trustworthy until the next successful push."""


@dataclass(frozen=True)
class WeightPushOptions:
    """transport: a registered transport name (object_store | cuda_ipc | nccl | inline).
    bucket_mb: bucket size in MiB. verify: "none"; "digest" (every engine hashes each received bucket
    and it must equal the sender's hash); "checksum" (after the push, all engines' full weight
    checksums must be equal); "all" (both). timeout_s: per bucket and per finish call.
    max_inflight_buckets: 1 = the sender builds bucket k+1 only after every engine loaded bucket k
    (one bucket materialised at a time); 2 overlaps building k+1 with loading k (two buckets)."""

    transport: str = "object_store"
    bucket_mb: float = 512.0
    verify: str = "none"
    timeout_s: float = 600.0
    max_inflight_buckets: int = 1
    transport_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.verify not in ("none", "digest", "checksum", "all"):
            raise ValueError(f"WeightPushOptions.verify must be none|digest|checksum|all, got {self.verify!r}")
        if self.max_inflight_buckets < 1:
            raise ValueError(f"WeightPushOptions.max_inflight_buckets must be >= 1, got {self.max_inflight_buckets}")
        if self.bucket_mb <= 0:
            raise ValueError(f"WeightPushOptions.bucket_mb must be positive, got {self.bucket_mb}")
        get_transport_class(self.transport)  # unknown names fail here, listing the registered ones

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2**20)


@dataclass
class PushStats:
    """Numbers of one push. `seconds` is wall time on the sender from begin to finish (all engines)."""

    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    engine_checksums: list[str] = field(default_factory=list)
    weights_version: int = 0
    send_seconds: float = 0.0  # sender: building and shipping buckets
    engine_load_seconds: float = 0.0  # slowest engine's decode + load, summed over buckets
    finish_seconds: float = 0.0  # vLLM's post-load processing (and the CPU MoE re-prepack)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")


class WeightPusher:
    """Ships weights to a fixed list of engine actors (`VLLMEngine` Ray actors, or anything with the
    same `begin_weight_update / load_weight_bucket / finish_weight_update` remote methods)."""

    def __init__(self, engines: list, options: WeightPushOptions = WeightPushOptions()):
        if not engines:
            raise ValueError("WeightPusher needs at least one engine")
        self.engines = list(engines)
        self.options = options
        self._transport = None
        # The highest version this pusher gave: versions only grow, even when every engine it sends
        # to was restarted (a fresh engine reports 0) and the push is redone.
        self.last_version = 0

    def _sender_transport(self):
        if self._transport is None:
            self._transport = get_transport_class(self.options.transport)(**self.options.transport_kwargs)
            self._transport.connect(self.engines)
        return self._transport

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, is_sender: bool = True,
             version: int | None = None) -> PushStats:
        """Deliver every (hf_name, tensor) to all engines. Non-senders only drain the iterator.
        The engines' weights version becomes `version`, or (None) one more than the highest they had.
        If the push fails, the sender still drains the iterator (the other ranks' exporters run
        collectives with it) and every engine keeps its weights version."""
        named_tensors = iter(named_tensors)
        if not is_sender:
            for _ in named_tensors:
                pass
            return PushStats()
        try:
            return self._push(named_tensors, version)
        except BaseException:
            try:
                for _ in named_tensors:
                    pass
            except Exception:  # noqa: BLE001 - the push's error is the one to report
                pass
            raise

    def _push(self, named_tensors, version: int | None) -> PushStats:
        import ray

        opts = self.options
        transport = self._sender_transport()
        stats = PushStats()
        start = time.perf_counter()
        begun = [e.begin_weight_update.remote() for e in self.engines]
        try:
            versions = self._wait(begun, "begin_weight_update")
        except WeightPushError:
            self._finish_begun(begun)
            raise
        if version is None:  # the same number on every engine
            version = max([v or 0 for v in versions] + [self.last_version]) + 1
        new_version = version
        want_digest = opts.verify in ("digest", "all")
        inflight: deque = deque()  # (bucket, refs) shipped but not yet confirmed by every engine
        try:
            for bucket in iter_buckets(named_tensors, opts.bucket_bytes):
                sent = time.perf_counter()
                inflight.append((bucket, transport.send_bucket(bucket, self.engines, digest=want_digest)))
                stats.send_seconds += time.perf_counter() - sent
                del bucket
                while len(inflight) >= opts.max_inflight_buckets:
                    self._confirm(*inflight.popleft(), stats, want_digest)
            while inflight:
                self._confirm(*inflight.popleft(), stats, want_digest)
        except BaseException:
            # Leave the engines in a loadable state (vLLM puts the old kernel tensors back for layers
            # that did not arrive) and at their old version; the caller sees the original error.
            try:
                ray.get([e.finish_weight_update.remote(v) for e, v in zip(self.engines, versions)], timeout=opts.timeout_s)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        if stats.tensors == 0:
            self._wait([e.finish_weight_update.remote(v) for e, v in zip(self.engines, versions)], "finish_weight_update")
            raise WeightPushError("the weight iterator yielded no tensors; nothing was pushed")
        finishing = time.perf_counter()
        finished = self._wait([e.finish_weight_update.remote(new_version) for e in self.engines], "finish_weight_update")
        stats.finish_seconds = time.perf_counter() - finishing
        stats.seconds = time.perf_counter() - start
        stats.weights_version = max(f["weights_version"] for f in finished)
        self.last_version = max(self.last_version, stats.weights_version)
        if opts.verify in ("checksum", "all"):
            stats.engine_checksums = self._wait([e.weights_checksum.remote() for e in self.engines], "weights_checksum")
            if len(set(stats.engine_checksums)) != 1:
                raise WeightPushError(f"engines hold different weights after the push: {stats.engine_checksums}")
        return stats

    def _finish_begun(self, begun: list) -> None:
        """An engine failed to begin: close the update on those that did, at their old version."""
        import ray

        for engine, ref in zip(self.engines, begun):
            try:
                version = ray.get(ref, timeout=self.options.timeout_s)
                ray.get(engine.finish_weight_update.remote(version), timeout=self.options.timeout_s)
            except Exception:  # noqa: BLE001 - this engine is the failed one
                pass

    def _confirm(self, bucket, refs: list, stats: PushStats, want_digest: bool) -> None:
        reports = self._wait(refs, f"load of bucket {stats.buckets}")
        stats.engine_load_seconds += max(r.get("seconds", 0.0) for r in reports)
        if want_digest:
            expected = bucket_digest(bucket)
            bad = [i for i, r in enumerate(reports) if r.get("digest") != expected]
            if bad:
                raise WeightPushError(f"bucket {stats.buckets}: engines {bad} received different bytes than sent")
        stats.buckets += 1
        stats.tensors += len(bucket)
        stats.bytes += sum(tensor_nbytes(t) for _, t in bucket)

    def _wait(self, refs: list, what: str) -> list:
        import ray

        try:
            return ray.get(refs, timeout=self.options.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise WeightPushError(f"weight push: {what} did not finish within {self.options.timeout_s:.0f} s") from e
        except ray.exceptions.RayActorError as e:
            raise WeightPushError(f"weight push: an engine died during {what}: {e}") from e

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
