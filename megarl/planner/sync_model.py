"""Model of one trainer → rollout weight push with one sender per pipeline stage
(`megarl.models.stage_export` + `WeightPusher`), from the model's config and the layout alone.

Per stage: the HF bytes its sender ships, the bytes it receives in the stage's gathers (TP-sharded
dense tensors over TP, routed experts over ETP then EP; other ranks receive nothing), and the
number of gather collectives. Byte counts are exact (the tests check them against a real push of
the tiny model); the time is a bandwidth model with the stated `SyncAssumptions`:

- gathers run inside a node over NVLink when the group fits in a node, else over the network;
- each sender then broadcasts its stage to every engine, one engine after the other (one NCCL
  group per sender and engine), and every rollout worker ingests the full HF bytes of every
  stage (vLLM's loaders take full tensors and shard them locally), one sender at a time;
- buckets are not overlapped (`max_inflight_buckets=1`): per bucket, gather + send + load.

So the push takes about max(slowest sender's gather + send + load, one engine worker's ingest +
load of the whole model) plus vLLM's post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megarl.planner.memory import ParallelSizes, padded_vocab, stage_layer_counts
from megarl.planner.model_stats import ModelStats

GB = 1e9

# Published trainer → rollout weight sync times of comparable models, as cited in issue #19
# (vendor/blog figures, hardware differs; listed for orientation, not measured here).
PEER_FIGURES = (
    ("verl checkpoint engine", "Qwen3-235B-A22B", 23.7),
    ("NeMo-RL refit", "Qwen3-235B-A22B", 30.0),
    ("slime (one sender per PP stage)", "GLM-4.5-355B-A32B", 48.0),
)


@dataclass(frozen=True)
class SyncAssumptions:
    """Effective bandwidths in GB/s (1e9 bytes) per GPU; defaults: H100-class nodes with NVLink 4
    and one 400 Gb/s NDR NIC per GPU, at the efficiencies NCCL usually reaches."""

    nvlink_gbps: float = 150.0  # gather into one GPU over NVLink (NVLink 4: 450 GB/s per direction raw)
    network_gbps: float = 40.0  # broadcast bus bandwidth across nodes per GPU (400 Gb/s = 50 GB/s raw)
    engine_load_gbps: float = 100.0  # a vLLM worker copying/sharding received tensors into its weights
    finish_seconds: float = 2.0  # vLLM's process_weights_after_loading and cache resets, per push
    vocab_pad_multiple: int = 128  # megatron's make_vocab_size_divisible_by (per TP rank)


@dataclass(frozen=True)
class StageSync:
    stage: int
    layers: int
    hf_bytes: int  # HF tensors this stage's sender ships
    received_bytes: int  # what the sender receives in the stage's gathers (others: 0)
    gathers: int  # gather collectives the sender joins
    seconds: float  # this sender: gathers + sends + loads


@dataclass
class SyncPlan:
    stages: list[StageSync]
    num_engines: int
    rollout_tp: int
    transport: str
    seconds: float
    engine_ingest_seconds: float
    assumptions: SyncAssumptions
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s.hf_bytes for s in self.stages)


def _stage_layers(m: ModelStats, par: ParallelSizes) -> list[range]:
    counts = stage_layer_counts(m.num_layers, par.pp, par.num_layers_in_last_pipeline_stage)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def stage_sync_bytes(m: ModelStats, par: ParallelSizes, bytes_per_param: int,
                     assume: SyncAssumptions = SyncAssumptions()) -> list[tuple[int, int]]:
    """Per pipeline stage: (HF bytes shipped by its sender, bytes its sender receives in gathers)."""
    out = []
    stages = _stage_layers(m, par)
    for stage, layers in enumerate(stages):
        first, last = stage == 0, stage == len(stages) - 1
        dense = sum(m.layer_dense_params(i) for i in layers)
        experts = sum(m.layer_expert_params(i) for i in layers)
        hf = dense + experts
        # TP-sharded dense parameters: attention projections, dense MLPs, embedding rows, lm_head
        # rows (megatron pads the vocabulary; the gathered shards include the padding).
        sharded = sum(m.attention_linear_params + (0 if m.moe_layers[i] else m.dense_mlp_params) for i in layers)
        vocab_rows = padded_vocab(m.vocab_size, par.tp, assume.vocab_pad_multiple) if par.tp > 1 else m.vocab_size
        if first:
            hf += m.embedding_params
            sharded += vocab_rows * m.hidden_size
        if last:
            hf += m.final_norm_params + m.lm_head_params
            sharded += vocab_rows * m.hidden_size if m.lm_head_params else 0
        received = sharded * (par.tp - 1) // par.tp + experts * (par.ep * par.etp - 1) // (par.ep * par.etp)
        out.append((hf * bytes_per_param, received * bytes_per_param))
    return out


def _local_bytes(m: ModelStats, par: ParallelSizes, layers: range, bytes_per_param: int) -> int:
    dense = sum(m.layer_dense_params(i) for i in layers) // par.tp
    experts = sum(m.layer_expert_params(i) for i in layers) // (par.ep * par.etp)
    return (dense + experts) * bytes_per_param


def plan_sync(m: ModelStats, par: ParallelSizes, *, bytes_per_param: int, rollout_tp: int, num_engines: int,
              gpus_per_node: int, bucket_bytes: int, transport: str = "nccl",
              assume: SyncAssumptions = SyncAssumptions()) -> SyncPlan:
    """The modelled push (see the module docstring)."""
    notes = []
    per_stage = stage_sync_bytes(m, par, bytes_per_param, assume)
    tp_bw = assume.nvlink_gbps if par.tp <= gpus_per_node else assume.network_gbps
    # megatron's expert grid orders ETP then EP fastest: an EP group spans ETP x EP consecutive ranks
    expert_bw = assume.nvlink_gbps if par.ep * par.etp <= gpus_per_node else assume.network_gbps
    engine_in_node = rollout_tp <= gpus_per_node
    send_bw = assume.nvlink_gbps if transport == "cuda_ipc" else assume.network_gbps
    if transport == "cuda_ipc" and not (engine_in_node and par.pp == 1):
        notes.append("cuda_ipc reaches only engine workers on the sender's node; with one sender per stage "
                     f"(PP {par.pp}) and rollout TP {rollout_tp} most workers sit on other nodes: modelled as 'nccl'")
        send_bw, transport = assume.network_gbps, "nccl"
    stages = []
    for stage, (layers, (hf, received)) in enumerate(zip(_stage_layers(m, par), per_stage)):
        local = _local_bytes(m, par, layers, bytes_per_param)
        buckets = max(1, math.ceil(local / bucket_bytes))
        gathers = buckets * ((par.tp > 1) + (par.etp > 1) + (par.ep > 1))
        dense_received = received - _expert_received(m, par, layers, bytes_per_param)
        gather_s = dense_received / (tp_bw * GB) + (received - dense_received) / (expert_bw * GB)
        send_s = num_engines * hf / (send_bw * GB)  # one engine after the other
        load_s = hf / (assume.engine_load_gbps * GB)
        stages.append(StageSync(stage, len(layers), hf, received, gathers, gather_s + send_s + load_s))
    total = sum(s.hf_bytes for s in stages)
    # Every rollout worker ingests every stage's bytes, one sender's bucket at a time.
    ingest = total / (send_bw * GB) + total / (assume.engine_load_gbps * GB)
    seconds = max(max(s.seconds for s in stages), ingest) + assume.finish_seconds
    return SyncPlan(stages, num_engines, rollout_tp, transport, seconds, ingest, assume, notes)


def _expert_received(m: ModelStats, par: ParallelSizes, layers: range, bytes_per_param: int) -> int:
    experts = sum(m.layer_expert_params(i) for i in layers)
    return experts * (par.ep * par.etp - 1) // (par.ep * par.etp) * bytes_per_param


def format_sync_plan(plan: SyncPlan) -> list[str]:
    a = plan.assumptions
    lines = [f"weight sync (one sender per pipeline stage, {plan.transport}, {plan.num_engines} engines x rollout TP "
             f"{plan.rollout_tp}): {plan.total_bytes / GB:.1f} GB per push, modelled {plan.seconds:.1f} s",
             f"  assumptions: NVLink {a.nvlink_gbps:g} GB/s, network {a.network_gbps:g} GB/s per GPU, vLLM load "
             f"{a.engine_load_gbps:g} GB/s per worker, finish {a.finish_seconds:g} s; buckets not overlapped",
             "  stage layers  sender GB  received GB  gathers  sender s"]
    for s in plan.stages:
        lines.append(f"  {s.stage:5d} {s.layers:6d} {s.hf_bytes / GB:10.2f} {s.received_bytes / GB:12.2f} "
                     f"{s.gathers:8d} {s.seconds:9.1f}")
    lines.append(f"  one engine worker ingests the whole model: {plan.engine_ingest_seconds:.1f} s")
    lines.append("  published (issue #19): " + "; ".join(f"{who} {model} {t:g} s" for who, model, t in PEER_FIGURES))
    lines.extend(f"  note: {n}" for n in plan.notes)
    return lines
