"""Push trainer weights (any iterator of (hf_name, tensor)) into every rollout engine.

    pusher = WeightPusher(group.engines, WeightPushOptions(transport="object_store", bucket_mb=512))
    stats = pusher.push(export_hf_weights(handle), is_sender=(rank == 0))

Several senders (one per pipeline stage, `megarl.models.stage_export`) split the push in three:

    version = coordinator.begin()                        # one process: engines enter reload mode
    sent = pusher_of_stage_s.send(stage_tensors)         # every sender, concurrently (own transport)
    stats = coordinator.finish(version, [sent, ...])     # one process: engines process the weights

`finish` checks that each engine received every sent tensor exactly once (counted by the engine).
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


VERIFY_MODES = ("none", "digest", "checksum", "all", "logprobs")


class WeightPushError(RuntimeError):
    """A push failed or delivered something other than what was sent; the engines' weights are not
    trustworthy until the next successful push."""


@dataclass(frozen=True)
class WeightPushOptions:
    """transport: a registered transport name (object_store | cuda_ipc | nccl | inline).
    bucket_mb: bucket size in MiB. verify: "none"; "digest" (every engine hashes each received bucket
    and it must equal the sender's hash); "checksum" (after the push, all engines' full weight
    checksums must be equal); "all" (both); "logprobs" (after the push every engine scores fixed
    probe sequences and its log-probs must equal the trainer's within `logprob_atol`; the caller
    passes the trainer's `LogprobProbe`). timeout_s: per bucket and per finish call.
    logprob_atol: 1e-4 suits fp32 (tiny models on CPU agree to ~1e-6); bf16 engines need ~5e-2.
    max_inflight_buckets: 1 = the sender builds bucket k+1 only after every engine loaded bucket k
    (one bucket materialised at a time); 2 overlaps building k+1 with loading k (two buckets)."""

    transport: str = "object_store"
    bucket_mb: float = 512.0
    verify: str = "none"
    timeout_s: float = 600.0
    max_inflight_buckets: int = 1
    transport_kwargs: dict = field(default_factory=dict)
    logprob_atol: float = 1e-4

    @classmethod
    def from_config(cls, weight_sync, transport: str) -> "WeightPushOptions":
        """From megarl.config's WeightSyncConfig; `transport` is the device plan's decision (the
        config's `auto` resolved). The nccl transport gets its rendezvous host and port."""
        kwargs = {"host": weight_sync.nccl_host, "port": weight_sync.nccl_port} if transport == "nccl" else {}
        return cls(transport=transport, bucket_mb=weight_sync.bucket_mb, verify=weight_sync.verify,
                   transport_kwargs=kwargs)

    def __post_init__(self):
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"WeightPushOptions.verify must be {'|'.join(VERIFY_MODES)}, got {self.verify!r}")
        if not self.logprob_atol > 0:
            raise ValueError(f"WeightPushOptions.logprob_atol must be positive, got {self.logprob_atol}")
        if self.max_inflight_buckets < 1:
            raise ValueError(f"WeightPushOptions.max_inflight_buckets must be >= 1, got {self.max_inflight_buckets}")
        if self.bucket_mb <= 0:
            raise ValueError(f"WeightPushOptions.bucket_mb must be positive, got {self.bucket_mb}")
        get_transport_class(self.transport)  # unknown names fail here, listing the registered ones

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2**20)


@dataclass(frozen=True)
class LogprobProbe:
    """Fixed token sequences and the trainer's log-probs of them (temperature 1, `score` layout:
    logprobs[b][0] = 0, logprobs[b][t] = log p(seq[t] | seq[:t]))."""

    sequences: list[list[int]]
    logprobs: list[list[float]]

    def __post_init__(self):
        if len(self.sequences) != len(self.logprobs) or any(
                len(s) != len(l) for s, l in zip(self.sequences, self.logprobs)):
            raise ValueError("LogprobProbe: one log-prob per token of every sequence is needed")


def probe_sequences(vocab_size: int, count: int = 2, length: int = 24, seed: int = 1234) -> list[list[int]]:
    """The fixed sequences of the log-prob check: pseudo-random ids in [3, vocab_size), the same
    on every rank and every push."""
    gen = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)
    return [torch.randint(low, vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


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
    senders: int = 1
    engine_tensors_received: list[int] = field(default_factory=list)  # per engine, counted by the engine
    logprob_max_diff: float | None = None  # verify="logprobs": worst |engine - trainer| over the probe

    def add(self, other: "PushStats") -> None:
        """Sum a sender's numbers into a total (the slowest sender's time counts)."""
        self.tensors += other.tensors
        self.bytes += other.bytes
        self.buckets += other.buckets
        self.send_seconds = max(self.send_seconds, other.send_seconds)
        self.engine_load_seconds = max(self.engine_load_seconds, other.engine_load_seconds)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")


class WeightPusher:
    """Ships weights to a fixed list of engine actors (`VLLMEngine` Ray actors, or anything with the
    same `begin_weight_update / load_weight_bucket / finish_weight_update` remote methods).

    `sender_index` names this sender among several (one per pipeline stage): transports that need a
    channel per sender (NCCL groups and ports) derive it from the index."""

    def __init__(self, engines: list, options: WeightPushOptions = WeightPushOptions(), *, sender_index: int = 0):
        if not engines:
            raise ValueError("WeightPusher needs at least one engine")
        if sender_index < 0:
            raise ValueError(f"sender_index must be >= 0, got {sender_index}")
        self.engines = list(engines)
        self.options = options
        self.sender_index = sender_index
        self._transport = None
        # The highest version this pusher gave: versions only grow, even when every engine it sends
        # to was restarted (a fresh engine reports 0) and the push is redone.
        self.last_version = 0
        self._old_versions: list[int] = []  # the engines' versions when the current push began

    def _sender_transport(self):
        if self._transport is None:
            cls = get_transport_class(self.options.transport)
            self._transport = cls.for_sender(self.sender_index, **self.options.transport_kwargs)
            self._transport.connect(self.engines)
        return self._transport

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, is_sender: bool = True,
             probe: LogprobProbe | None = None, version: int | None = None) -> PushStats:
        """Deliver every (hf_name, tensor) to all engines. Non-senders only drain the iterator.
        The engines' weights version becomes `version`, or (None) one more than the highest they or
        this pusher had. If the push fails, the sender still drains the iterator (the other ranks'
        exporters run collectives with it) and every engine keeps its weights version."""
        named_tensors = iter(named_tensors)
        if not is_sender:
            _drain(named_tensors)
            return PushStats()
        start = time.perf_counter()
        try:
            self.check_probe(probe)
            version = self.begin(version)
        except BaseException:
            _drain(named_tensors)
            raise
        try:
            sent = self.send(named_tensors)
        except BaseException:
            self.abort()
            raise
        stats = self.finish(version, [sent], probe=probe)
        stats.seconds = time.perf_counter() - start
        return stats

    def check_probe(self, probe: LogprobProbe | None) -> None:
        """verify="logprobs" needs the trainer's log-probs: refuse before any byte moves."""
        if self.options.verify == "logprobs" and probe is None:
            raise ValueError("WeightPushOptions.verify='logprobs' needs the trainer's LogprobProbe (log-probs of "
                             "probe_sequences(vocab_size)) passed to push()/finish()")

    def begin(self, version: int | None = None) -> int:
        """Put every engine in reload mode; returns the weights version the push will set (the same
        number on every engine; versions only grow, even when every engine was restarted and reports 0)."""
        begun = [e.begin_weight_update.remote() for e in self.engines]
        try:
            versions = self._wait(begun, "begin_weight_update")
        except WeightPushError:
            self._finish_begun(begun)
            raise
        self._old_versions = [v or 0 for v in versions]
        return version if version is not None else max(self._old_versions + [self.last_version]) + 1

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> PushStats:
        """Ship this sender's tensors in buckets (engines must be in reload mode: `begin`).

        On a failure the rest of the iterator is still drained (an exporter runs collectives with
        other ranks, which would otherwise hang), then the error propagates."""
        opts = self.options
        stats = PushStats()
        want_digest = opts.verify in ("digest", "all")
        inflight: deque = deque()  # (bucket, refs) shipped but not yet confirmed by every engine
        iterator = iter(named_tensors)
        try:
            transport = self._sender_transport()
            for bucket in iter_buckets(iterator, opts.bucket_bytes):
                sent = time.perf_counter()
                inflight.append((bucket, transport.send_bucket(bucket, self.engines, digest=want_digest)))
                stats.send_seconds += time.perf_counter() - sent
                del bucket
                while len(inflight) >= opts.max_inflight_buckets:
                    self._confirm(*inflight.popleft(), stats, want_digest)
            while inflight:
                self._confirm(*inflight.popleft(), stats, want_digest)
        except BaseException:
            _drain(iterator)
            raise
        return stats

    def abort(self) -> None:
        """After a failed send: leave the engines loadable (vLLM puts the old kernel tensors back for
        layers that did not arrive) and at their old weights version. The caller reports the original
        error."""
        import ray

        try:
            ray.get(self._finish_at_old_versions(), timeout=self.options.timeout_s)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass

    def _finish_at_old_versions(self) -> list:
        return [e.finish_weight_update.remote(v) for e, v in zip(self.engines, self._old_versions)]

    def _finish_begun(self, begun: list) -> None:
        """An engine failed to begin: close the update on those that did, at their old version."""
        import ray

        for engine, ref in zip(self.engines, begun):
            try:
                version = ray.get(ref, timeout=self.options.timeout_s)
                ray.get(engine.finish_weight_update.remote(version), timeout=self.options.timeout_s)
            except Exception:  # noqa: BLE001 - this engine is the failed one
                pass

    def finish(self, version: int, sent: list[PushStats], *, probe: LogprobProbe | None = None) -> PushStats:
        """End the push on every engine and verify it: every engine received each sent tensor exactly
        once, plus the `verify` mode's checks. `sent`: every sender's `send` result."""
        self.check_probe(probe)
        opts = self.options
        stats = PushStats(senders=len(sent))
        for part in sent:
            stats.add(part)
        if stats.tensors == 0:
            self._wait(self._finish_at_old_versions(), "finish_weight_update")
            raise WeightPushError("the weight iterator yielded no tensors; nothing was pushed")
        finishing = time.perf_counter()
        finished = self._wait([e.finish_weight_update.remote(version) for e in self.engines], "finish_weight_update")
        stats.finish_seconds = time.perf_counter() - finishing
        stats.weights_version = max(f["weights_version"] for f in finished)
        self.last_version = max(self.last_version, stats.weights_version)
        stats.engine_tensors_received = [f.get("received", stats.tensors) for f in finished]
        for index, report in enumerate(finished):
            if report.get("repeated"):
                raise WeightPushError(f"engine {index} received tensors more than once (two senders exported them): "
                                      f"{report['repeated']}")
        wrong = [i for i, n in enumerate(stats.engine_tensors_received) if n != stats.tensors]
        if wrong:
            raise WeightPushError(f"engines {wrong} received {[stats.engine_tensors_received[i] for i in wrong]} "
                                  f"tensors, the senders sent {stats.tensors}")
        if opts.verify in ("checksum", "all"):
            stats.engine_checksums = self._wait([e.weights_checksum.remote() for e in self.engines], "weights_checksum")
            if len(set(stats.engine_checksums)) != 1:
                raise WeightPushError(f"engines hold different weights after the push: {stats.engine_checksums}")
        if opts.verify == "logprobs":
            stats.logprob_max_diff = self.check_logprobs(probe)
        return stats

    def check_logprobs(self, probe: LogprobProbe) -> float:
        """Every engine's log-probs of the probe sequences against the trainer's; raises
        WeightPushError beyond `logprob_atol`. Returns the worst absolute difference."""
        scores = self._wait([e.score.remote(probe.sequences) for e in self.engines], "log-prob check")
        worst, where = 0.0, None
        for index, engine_scores in enumerate(scores):
            for b, (got, want) in enumerate(zip(engine_scores, probe.logprobs, strict=True)):
                diff = (torch.tensor(got[1:], dtype=torch.float64) - torch.tensor(want[1:], dtype=torch.float64)).abs()
                if diff.numel() and diff.max().item() > worst:
                    worst, where = diff.max().item(), (index, b)
        if worst > self.options.logprob_atol:
            raise WeightPushError(f"after the push engine {where[0]}'s log-probs of probe sequence {where[1]} differ "
                                  f"from the trainer's by {worst:.2e} (> logprob_atol {self.options.logprob_atol:g}): "
                                  "the engine does not compute with the pushed weights")
        return worst

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


def _drain(iterator) -> None:
    """Run an exporter to its end without shipping (its collectives must complete on every rank)."""
    try:
        for _ in iterator:
            pass
    except Exception:  # noqa: BLE001 - the push's own error is the one to report
        pass
