"""Push a sharded megatron model from its torch.distributed world into the rollout engines.

    push = MegatronWeightPush(handle, engines, WeightPushOptions(...))   # every rank, same call order
    metrics = push.push()                                                # every rank; metrics on rank 0

With the engine handles on every rank (Ray worker group, or ranks that joined the Ray cluster),
each pipeline stage's first rank sends its own stage (`export_stage_hf_weights`: gathers batched
per bucket, no rank receives another stage's bytes): rank 0 puts the engines in reload mode, the
senders ship concurrently (each with its own transport channel, `sender_index` = stage), rank 0
finishes and verifies. When only rank 0 holds handles (torchrun: `engines=None` elsewhere) it
falls back to the per-tensor exporter with rank 0 sending everything.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from megarl.rollout.weight_sync.pusher import LogprobProbe, PushStats, WeightPusher, WeightPushError, WeightPushOptions


class MegatronWeightPush:
    def __init__(self, handle, engines: list | None, options: WeightPushOptions):
        from megatron.core import parallel_state

        from megarl.models.stage_export import is_stage_sender

        self.handle, self.options = handle, options
        self.rank = dist.get_rank()
        self.sender = is_stage_sender(handle)
        roles = [None] * dist.get_world_size()
        dist.all_gather_object(roles, (self.sender, engines is not None))
        self.by_stage = all(has_engines for sender, has_engines in roles if sender)
        self.pusher = None
        if self.by_stage and self.sender:
            self.pusher = WeightPusher(engines, options, sender_index=parallel_state.get_pipeline_model_parallel_rank())
        elif not self.by_stage and self.rank == 0:
            if engines is None:
                raise ValueError("MegatronWeightPush: rank 0 needs the engine handles")
            self.pusher = WeightPusher(engines, options)

    def push(self, probe: LogprobProbe | None = None) -> dict | None:
        """Every rank calls it; metrics (dict) on rank 0, None elsewhere. `probe`: rank 0's
        trainer log-probs for verify="logprobs"."""
        if self.rank == 0:
            self.pusher.check_probe(probe)
        if self.by_stage:
            return self._push_by_stage(probe)
        from megarl.models.export import export_hf_weights
        from megarl.models.stage_export import ExportTraffic

        traffic = ExportTraffic()
        stream = export_hf_weights(self.handle, traffic=traffic)
        if self.rank != 0:
            for _ in stream:  # collectives: every rank walks the export
                pass
            return None
        stats = self.pusher.push(stream, is_sender=True, probe=probe)
        metrics = push_metrics(stats)
        metrics["weight_push/rank0_received_gbytes"] = traffic.bytes_received / 1e9
        return metrics

    def _push_by_stage(self, probe) -> dict | None:
        from megatron.core import parallel_state

        from megarl.models.stage_export import ExportTraffic, export_stage_hf_weights

        started = time.perf_counter()
        begun = [None]
        if self.rank == 0:
            try:
                begun = [(self.pusher.begin(), None)]
            except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
                begun = [(None, exc)]
        dist.broadcast_object_list(begun, src=0)
        version, error = begun[0]
        if error is not None:
            raise WeightPushError(f"weight push: begin_weight_update failed on rank 0: {error!r}") from error
        traffic, sent, error = ExportTraffic(), PushStats(), None
        stream = export_stage_hf_weights(self.handle, self.options.bucket_bytes, traffic)
        try:
            if self.sender:
                sent = self.pusher.send(stream)
            else:
                for _ in stream:  # gathers to this stage's sender
                    pass
        except Exception as exc:  # noqa: BLE001 - reported by every rank below
            error = f"rank {self.rank}: {exc!r}"
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (parallel_state.get_pipeline_model_parallel_rank(), self.sender,
                                         sent, traffic, error))
        errors = [r[4] for r in reports if r[4]]
        if errors:
            if self.rank == 0:
                self.pusher.abort()
            raise WeightPushError("weight push failed: " + "; ".join(errors))
        if self.rank != 0:
            return None
        stats = self.pusher.finish(version, [r[2] for r in reports if r[1]], probe=probe)
        stats.seconds = time.perf_counter() - started
        stage_bytes = {r[0]: r[3].hf_bytes for r in reports if r[1]}
        metrics = push_metrics(stats)
        metrics["weight_push/senders"] = stats.senders
        metrics["weight_push/max_received_over_stage_bytes"] = max(
            r[3].bytes_received / max(stage_bytes[r[0]], 1) for r in reports)
        metrics["weight_push/max_received_gbytes"] = max(r[3].bytes_received for r in reports) / 1e9
        metrics["weight_push/sender_collectives"] = max(r[3].collectives for r in reports)
        return metrics

    def replace_engines(self, engines: dict) -> None:
        """{engine index: new actor handle} after a restart; this rank's sender (if any) reconnects on
        its next push."""
        if self.pusher is not None:
            for index, handle in engines.items():
                self.pusher.engines[int(index)] = handle
            self.pusher.close()

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()


def push_metrics(stats: PushStats) -> dict:
    metrics = {"weight_push/seconds": stats.seconds, "weight_push/gbytes": stats.bytes / 1e9,
               "weight_push/gb_per_s": stats.gb_per_s, "weight_push/buckets": stats.buckets,
               "weight_push/tensors": stats.tensors}
    if stats.engine_tensors_received:  # counted by each engine; the pusher refused any != tensors
        metrics["weight_push/engine_tensors_received_min"] = min(stats.engine_tensors_received)
        metrics["weight_push/engine_tensors_received_max"] = max(stats.engine_tensors_received)
    if stats.logprob_max_diff is not None:
        metrics["weight_push/logprob_max_diff"] = stats.logprob_max_diff
    return metrics
