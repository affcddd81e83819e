"""Export a sharded megatron model's HF tensors stage by stage: one sender per pipeline stage.

    traffic = ExportTraffic()
    for hf_name, tensor in export_stage_hf_weights(handle, bucket_bytes, traffic):   # every rank calls it
        ...   # only yields on this stage's sender (`is_stage_sender(handle)`)

Unlike `export.export_hf_weights` (every stage's tensors broadcast to every rank, one collective per
tensor), no rank here ever receives another stage's tensors, and the collectives are batched:

- the stage's parameters are cut into gather buckets of about `bucket_bytes` (by local shard size;
  every rank of a stage holds the same list of shards, so all cut identically);
- per bucket, the TP-sharded dense tensors travel in ONE `gather` over the TP group to TP rank 0
  (the shards flattened into one byte buffer), and the routed experts in ONE `gather` over ETP
  (then merged) and ONE over EP — each expert shard crosses the network once per push;
- only the members of the sender's groups take part (data-parallel replicas other than the first
  just return), and gathers go to the sender alone (not all-gathers).

The stage's sender is its first rank (TP, CP, DP, EP, ETP and expert-DP rank all 0). `ExportTraffic`
counts what this rank received and how many collectives it joined (tests and the sync model check
those numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from megarl.models.export import (
    _check_handle_is_current,
    _local_shards,
    _merge_expert_shards,
    _ShardInfo,
    bridge_mpu,
)
from megarl.models.naming import is_moe_expert_name, split_expert_name
from megarl.models.value_head import VALUE_HEAD_HF_NAMES

if TYPE_CHECKING:
    from megarl.models.builder import ModelHandle


@dataclass
class ExportTraffic:
    """What one rank saw during an export: bytes received by collectives (gathers, broadcasts,
    all-gathers), collectives joined, and the HF tensors it yielded."""

    bytes_received: int = 0
    collectives: int = 0
    hf_tensors: int = 0
    hf_bytes: int = 0

    def add(self, other: "ExportTraffic") -> None:
        self.bytes_received += other.bytes_received
        self.collectives += other.collectives
        self.hf_tensors += other.hf_tensors
        self.hf_bytes += other.hf_bytes


@dataclass(frozen=True)
class _Role:
    """Which of the sender's collectives this rank joins."""

    sender: bool
    tp_member: bool  # my TP group is the sender's (DP rank 0, CP rank 0)
    etp_member: bool  # my ETP group belongs to the sender's expert slice (expert-DP rank 0)
    ep_member: bool  # ... and my EP group is the sender's (ETP rank 0 too)


def _role(handle: "ModelHandle") -> _Role:
    from megatron.core import parallel_state as ps

    mpu = bridge_mpu(handle)
    tp_member = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    etp_member = ps.get_expert_data_parallel_rank() == 0
    ep_member = etp_member and mpu.etp_rank == 0
    sender = tp_member and mpu.tp_rank == 0
    if sender != (ep_member and mpu.ep_rank == 0):
        # megatron orders both grids so that a stage's first rank is rank 0 of every group; if that
        # ever changes, dense and expert tensors would gather to different ranks.
        raise RuntimeError(f"rank {dist.get_rank()}: the dense grid's sender and the expert grid's sender differ "
                           f"(tp {mpu.tp_rank}, ep {mpu.ep_rank}, etp {mpu.etp_rank}); cannot export by stage")
    return _Role(sender, tp_member, etp_member, ep_member)


def is_stage_sender(handle: "ModelHandle") -> bool:
    """True on the one rank per pipeline stage that yields (and sends) that stage's HF tensors."""
    return _role(handle).sender


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _gather_to_first(parts: list[torch.Tensor], group, size: int, traffic: ExportTraffic) -> list[list[torch.Tensor]] | None:
    """One `gather` of all `parts` (flattened into one byte buffer) to the group's rank 0.

    On that rank: for each member (in group order) its parts, shaped like `parts`; None elsewhere.
    Every member holds parts of the same shapes and dtypes (same model structure)."""
    flat = torch.cat([_as_bytes(p) for p in parts])
    first = dist.get_rank(group) == 0
    buffers = [torch.empty_like(flat) for _ in range(size)] if first else None
    dist.gather(flat, buffers, dst=dist.get_global_rank(group, 0), group=group)
    traffic.collectives += 1
    if not first:
        return None
    traffic.bytes_received += flat.numel() * (size - 1)
    members = []
    for buffer in buffers:
        offset, views = 0, []
        for p in parts:
            n = p.numel() * p.element_size()
            views.append(buffer[offset : offset + n].view(p.dtype).reshape(p.shape))
            offset += n
        members.append(views)
    return members


def _gather_buckets(local: list[tuple[_ShardInfo, torch.Tensor]], bucket_bytes: int) -> Iterator[list[int]]:
    """Indices of `local` cut into runs of at most `bucket_bytes` local bytes (a bigger shard alone)."""
    run, size = [], 0
    for index, (_, tensor) in enumerate(local):
        nbytes = tensor.numel() * tensor.element_size()
        if run and size + nbytes > bucket_bytes:
            yield run
            run, size = [], 0
        run.append(index)
        size += nbytes
    if run:
        yield run


def export_stage_hf_weights(handle: "ModelHandle", bucket_bytes: int = 512 * 2**20,
                            traffic: ExportTraffic | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for this pipeline stage's HF tensors, on the stage's sender only.

    Every rank of the world must iterate to the end (members of the sender's TP/ETP/EP groups run
    gathers inside; other ranks return at once). Each HF tensor of the model is yielded by exactly
    one sender. Tensors are fresh (never views of parameters); with tied embeddings the shared
    tensor comes from the first stage.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    _check_handle_is_current(handle)
    traffic = traffic if traffic is not None else ExportTraffic()
    role = _role(handle)
    if not (role.tp_member or role.etp_member):
        return
    bridge, mpu = handle.bridge, bridge_mpu(handle)
    local = _local_shards(handle)
    experts_per_rank = handle.config.num_moe_experts // mpu.ep_size if handle.config.num_moe_experts else 0
    for run in _gather_buckets(local, bucket_bytes):
        infos = [local[i][0] for i in run]
        shards = [local[i][1] for i in run]
        expert = [is_moe_expert_name(info.name) for info in infos]
        tp_split = [not e and info.tp_partition_dim is not None and mpu.tp_size > 1 for info, e in zip(infos, expert)]

        tp_parts: dict[int, list[torch.Tensor]] = {}
        sharded = [k for k, s in enumerate(tp_split) if s]
        if sharded and role.tp_member:
            gathered = _gather_to_first([shards[k] for k in sharded], mpu.tp_group, mpu.tp_size, traffic)
            if gathered is not None:
                tp_parts = {k: [member[j] for member in gathered] for j, k in enumerate(sharded)}

        expert_full: dict[int, list[torch.Tensor]] = {}  # bucket position -> full tensor per EP rank
        routed = [k for k, e in enumerate(expert) if e]
        if routed and role.etp_member:
            merged = [shards[k] for k in routed]
            if mpu.etp_size > 1:
                gathered = _gather_to_first(merged, mpu.etp_group, mpu.etp_size, traffic)
                merged = None if gathered is None else [
                    _merge_expert_shards(infos[k].name, [member[j] for member in gathered], handle.config.gated_linear_unit)
                    for j, k in enumerate(routed)]
            if merged is not None and role.ep_member:
                if mpu.ep_size > 1:
                    gathered = _gather_to_first(merged, mpu.ep_group, mpu.ep_size, traffic)
                    if gathered is not None:
                        expert_full = {k: [member[j] for member in gathered] for j, k in enumerate(routed)}
                else:
                    expert_full = {k: [merged[j]] for j, k in enumerate(routed)}
        if not role.sender:
            continue
        for k, (info, shard) in enumerate(zip(infos, shards)):
            for hf_name, tensor in _hf_tensors(bridge, info, shard, tp_parts.get(k), expert_full.get(k), experts_per_rank):
                tensor = tensor.contiguous()
                if tensor.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr():
                    tensor = tensor.clone()  # never hand out a view of a live parameter
                traffic.hf_tensors += 1
                traffic.hf_bytes += tensor.numel() * tensor.element_size()
                yield hf_name, tensor


def _hf_tensors(bridge, info: _ShardInfo, shard: torch.Tensor, tp_parts, expert_full, experts_per_rank: int):
    if info.name in VALUE_HEAD_HF_NAMES.values():
        yield info.name, shard
        return
    if expert_full is not None:
        stem, local_expert = split_expert_name(info.name)
        for ep_rank, full in enumerate(expert_full):
            global_name = f"{stem}{ep_rank * experts_per_rank + local_expert}"
            yield from zip(*bridge._weight_to_hf_format(global_name, full))
        return
    if tp_parts is not None:
        reference = shard.detach()
        # mbridge reads the partition attributes off a reference tensor for the generic case.
        reference.tensor_model_parallel, reference.partition_dim = True, info.tp_partition_dim
        full = bridge._weight_merge_across_tp(info.name, tp_parts, reference)
    else:
        full = shard
    yield from zip(*bridge._weight_to_hf_format(info.name, full))
