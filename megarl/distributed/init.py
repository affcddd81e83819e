"""Start torch.distributed and megatron's parallel state for a ParallelLayout.

Works the same under torchrun, inside a Ray actor (the launcher puts RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT into the actor's environment) and under megarl.testing.run_on_ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megarl.distributed.layout import LayoutError, ModelShape, ParallelLayout, validate_layout
from megarl.platform.device import accelerator_available, apply_device_compat, collective_backend

_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_current_layout: ParallelLayout | None = None


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the world and in megatron's grid."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    layout: ParallelLayout
    data_parallel_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    ep_rank: int
    dp_rank: int


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    missing = [name for name in _ENV_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and {missing} are not set: launch with torchrun, "
            "or set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (and LOCAL_RANK) in the Ray actor's environment"
        )
    return int(os.environ["WORLD_SIZE"])


def local_device_index() -> int:
    """The accelerator index this rank drives. The Ray worker group sets MEGARL_DEVICE_INDEX (the
    actor's GPU among its visible devices — 0 when Ray narrowed CUDA_VISIBLE_DEVICES to it, whatever
    LOCAL_RANK is); under torchrun every process sees the node's GPUs and LOCAL_RANK is the index."""
    if "MEGARL_DEVICE_INDEX" in os.environ:
        return int(os.environ["MEGARL_DEVICE_INDEX"])
    return int(os.environ.get("LOCAL_RANK", "0"))


def _init_process_group(timeout_s: float) -> None:
    if dist.is_initialized():
        return
    if accelerator_available():
        index, count = local_device_index(), torch.cuda.device_count()
        if index >= count:
            raise RuntimeError(f"rank {os.environ.get('RANK')} should use device {index} but sees {count} "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): set LOCAL_RANK / "
                               "MEGARL_DEVICE_INDEX to the index within the visible devices")
        torch.cuda.set_device(index)
    dist.init_process_group(
        backend=collective_backend(),
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=timeout_s),
    )


def init_distributed(
    layout: ParallelLayout,
    seed: int = 1234,
    timeout_s: float = 1800.0,
    *,
    shape: ModelShape | None = None,
    seq_length: int | None = None,
) -> DistributedInfo:
    """Process group (if not yet there) + device compat + megatron parallel state + megatron RNG.

    Validates `layout` against the world size (and against `shape` / `seq_length` when given)
    before creating any group. Calling it again with the same layout is a no-op; switching layouts
    needs `reset_model_parallel()` first. Seeds megatron's RNG tracker (per-TP/EP-rank streams)
    with `seed`, and torch's default generator with `seed`.
    """
    global _current_layout
    world_size = _world_size()
    validate_layout(layout, world_size, shape, seq_length)
    _init_process_group(timeout_s)
    apply_device_compat()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        if _current_layout != layout:
            raise LayoutError(
                f"megatron parallel state is already initialised for {_current_layout}; "
                f"call reset_model_parallel() before switching to {layout}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )
        _current_layout = layout
        model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)

    return DistributedInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),  # index among the node's ranks (torchrun's meaning)
        backend=dist.get_backend(),
        layout=layout,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def reset_model_parallel() -> None:
    """Destroy megatron's parallel state (groups, RNG tracker, buffers) but keep the process group,
    so one world can run several layouts (tests; re-sharding tools)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    global _current_layout
    parallel_state.destroy_model_parallel()
    megatron_random.get_cuda_rng_tracker().reset()
    # the MoE aux-loss logging tracker keeps per-layer buffers and process groups of the old layout
    get_moe_layer_wise_logging_tracker().clear()
    _current_layout = None


def current_layout() -> ParallelLayout | None:
    """The layout megatron's parallel state was initialised with by init_distributed, if any."""
    return _current_layout
