"""Stream a sharded megatron model's weights as full HuggingFace tensors.

    for hf_name, tensor in export_hf_weights(handle):   # every rank of the world iterates
        push(hf_name, tensor)

Order of work per tensor: the pipeline stage holding it broadcasts its shard over the PP group, then
TP shards (or, for routed experts, EP then ETP shards) are all-gathered, merged, and split into HF
tensors by mbridge's mapping. So one full tensor exists at a time, and every rank yields the same
sequence: stage by stage, in each stage's parameter order; an expert parameter yields all global
experts (EP rank 0's first). Routed experts appear under
`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`, the on-disk HF layout (transformers 5
fuses experts only in memory).

`save_hf_checkpoint(handle, out_dir)` writes the same stream as a HuggingFace folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from megarl.models.bridge import BridgeNamedChunk, unwrap_chunk
from megarl.models.value_head import VALUE_HEAD_HF_NAMES, is_value_model
from megarl.models.naming import is_moe_expert_name, split_expert_name

if TYPE_CHECKING:
    from megarl.models.builder import ModelHandle


@dataclass(frozen=True)
class _ShardInfo:
    """What every PP stage must know about a tensor it receives: mbridge name and local shard layout."""

    name: str  # mbridge (TE) name, global layer index, expert index local to the EP rank
    shape: tuple[int, ...]
    dtype: torch.dtype
    tp_partition_dim: int | None  # None: replicated across TP (or a routed expert: split over ETP)


def _local_shards(handle: "ModelHandle") -> list[tuple[_ShardInfo, torch.Tensor]]:
    """This rank's parameters in mbridge naming (all chunks), skipping what HF does not store."""
    bridge = handle.bridge
    tied = bool(getattr(handle.hf_config, "tie_word_embeddings", False))
    shards = []
    for chunk in handle.chunks:
        view = BridgeNamedChunk(chunk, handle.layer_spec)
        to_global = bridge._weight_name_mapping_mcore_local_to_global(view, consider_ep=False)
        for name, tensor in view.state_dict().items():
            global_name = to_global[name]
            if tied and global_name == "output_layer.weight":
                continue  # the same HF tensor as the input embedding, exported from the first stage
            partition_dim = tensor.partition_dim if getattr(tensor, "tensor_model_parallel", False) else None
            info = _ShardInfo(global_name, tuple(tensor.shape), tensor.dtype, partition_dim)
            shards.append((info, tensor.detach()))
        model = unwrap_chunk(chunk)
        if is_value_model(model):  # replicated over TP, exported under its HF name as is
            for key, hf_name in VALUE_HEAD_HF_NAMES.items():
                tensor = getattr(model.output_layer, key)
                shards.append((_ShardInfo(hf_name, tuple(tensor.shape), tensor.dtype, None), tensor.detach()))
    return shards


def _all_gather(tensor: torch.Tensor, group, size: int, traffic=None) -> list[torch.Tensor]:
    if size == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    if traffic is not None:
        traffic.collectives += 1
        traffic.bytes_received += tensor.numel() * tensor.element_size() * (size - 1)
    return parts


def _merge_expert_shards(name: str, shards: list[torch.Tensor], gated: bool) -> torch.Tensor:
    """Full expert weight from its ETP shards, megatron layout (fc1: [gate; up] rows, fc2: columns)."""
    if len(shards) == 1:
        return shards[0]
    if ".linear_fc2." in name:
        return torch.cat(shards, dim=1)
    if not gated:
        return torch.cat(shards, dim=0)
    gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards))
    return torch.cat([*gates, *ups], dim=0)


def bridge_mpu(handle: "ModelHandle"):
    """mbridge's snapshot of megatron's parallel sizes, ranks and groups, taken when the bridge was made."""
    return handle.bridge.mpu


def _full_tensors(handle: "ModelHandle", info: _ShardInfo, shard: torch.Tensor, traffic=None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one megatron shard present (after PP broadcast) on this rank."""
    bridge, mpu = handle.bridge, bridge_mpu(handle)
    if info.name in VALUE_HEAD_HF_NAMES.values():
        yield info.name, shard
        return
    if is_moe_expert_name(info.name):
        stem, local_expert = split_expert_name(info.name)
        experts_per_rank = handle.config.num_moe_experts // mpu.ep_size
        for ep_rank, ep_shard in enumerate(_all_gather(shard, mpu.ep_group, mpu.ep_size, traffic)):
            global_name = f"{stem}{ep_rank * experts_per_rank + local_expert}"
            etp_shards = _all_gather(ep_shard, mpu.etp_group, mpu.etp_size, traffic)
            full = _merge_expert_shards(global_name, etp_shards, handle.config.gated_linear_unit)
            yield from zip(*bridge._weight_to_hf_format(global_name, full))
        return
    if info.tp_partition_dim is not None and mpu.tp_size > 1:
        parts = _all_gather(shard, mpu.tp_group, mpu.tp_size, traffic)
        # mbridge reads the partition attributes off a reference tensor for the generic case.
        shard.tensor_model_parallel, shard.partition_dim = True, info.tp_partition_dim
        full = bridge._weight_merge_across_tp(info.name, parts, shard)
    else:
        full = shard
    yield from zip(*bridge._weight_to_hf_format(info.name, full))


def _check_handle_is_current(handle: "ModelHandle") -> None:
    """A handle built before megatron's parallel state was re-initialised holds destroyed process
    groups; collectives on them would fail obscurely or hang. Refuse it."""
    from megatron.core import parallel_state

    from megarl.models.builder import check_parallel_state_matches

    check_parallel_state_matches(handle.layout)
    mpu = bridge_mpu(handle)
    if mpu.tp_group is not parallel_state.get_tensor_model_parallel_group() or (
        mpu.pp_group is not parallel_state.get_pipeline_model_parallel_group()
    ):
        raise RuntimeError("this ModelHandle predates the current megatron parallel state; build the model again")


def export_hf_weights(handle: "ModelHandle", traffic=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for every tensor of the HF checkpoint, one at a time.

    Identical sequence on every rank; every rank must iterate to the end (collectives inside). The
    tensors are fresh copies (never views of the model's parameters) in the parameters' dtype.
    `traffic` (a `stage_export.ExportTraffic`) counts this rank's received bytes and collectives.
    For a weight push, `stage_export.export_stage_hf_weights` moves far fewer bytes.
    """
    _check_handle_is_current(handle)
    mpu = bridge_mpu(handle)
    local = _local_shards(handle)
    device = local[0][1].device
    catalogues: list[list[_ShardInfo]] = [[] for _ in range(mpu.pp_size)]
    if mpu.pp_size > 1:
        dist.all_gather_object(catalogues, [info for info, _ in local], group=mpu.pp_group)
    else:
        catalogues[0] = [info for info, _ in local]
    for stage, catalogue in enumerate(catalogues):
        is_mine = stage == mpu.pp_rank
        for index, info in enumerate(catalogue):
            if is_mine:
                shard = local[index][1].clone()
            else:
                shard = torch.empty(info.shape, dtype=info.dtype, device=device)
            if mpu.pp_size > 1:
                src = dist.get_global_rank(mpu.pp_group, stage)
                dist.broadcast(shard, src=src, group=mpu.pp_group)
                if traffic is not None:
                    traffic.collectives += 1
                    traffic.bytes_received += 0 if is_mine else shard.numel() * shard.element_size()
            for hf_name, tensor in _full_tensors(handle, info, shard, traffic):
                yield hf_name, tensor.contiguous()


_CHECKPOINT_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json",
)


def save_hf_checkpoint(handle: "ModelHandle", out_dir: str, max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write the model as a HuggingFace folder (safetensors shards + index, config and tokenizer
    files copied from `handle.hf_dir`). Every rank must call it; global rank 0 writes.

    Shards are written as they fill, so rank 0 holds at most one shard's tensors. Returns the
    written weight file names on rank 0, [] elsewhere.
    """
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    writer = dist.get_rank() == 0
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes, temp_names, weight_map = 0, 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        temp_name = f"model-part{len(temp_names):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, temp_name), metadata={"format": "pt"})
        weight_map.update({name: temp_name for name in shard})
        temp_names.append(temp_name)
        shard, shard_bytes = {}, 0

    if writer:
        os.makedirs(out_dir, exist_ok=True)
    for name, tensor in export_hf_weights(handle):
        if not writer:
            continue
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.cpu()
        shard_bytes += size
        total_bytes += size
    if not writer:
        return []
    if shard or not temp_names:
        flush()
    # Final names need the shard count, known only now: model.safetensors or model-0000i-of-0000n.
    count = len(temp_names)
    final = {t: "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
             for i, t in enumerate(temp_names)}
    for temp_name, final_name in final.items():
        os.replace(os.path.join(out_dir, temp_name), os.path.join(out_dir, final_name))
    if count > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": {name: final[t] for name, t in sorted(weight_map.items())}}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    for side_file in _CHECKPOINT_SIDE_FILES:
        source = os.path.join(handle.hf_dir, side_file)
        if os.path.exists(source):
            shutil.copy2(source, os.path.join(out_dir, side_file))
    if handle.value_head:  # a critic loads back as *ForTokenClassification with one label
        from megarl.models.value_head import value_model_config

        config_path = os.path.join(out_dir, "config.json")
        with open(config_path) as f:
            config = value_model_config(json.load(f))
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
    return list(final.values())
