"""Megatron model + optimizer + LR-schedule + RNG state, saved with megatron-core dist_checkpointing.

The format is megatron's own (`torch_dist`), so a checkpoint written at one parallel layout loads at
another (TP/PP/DP resharding), and megatron's tools read it. Two settings matter:
- `fully_reshardable` distributed-optimizer sharding without sub-optimizer prefixes: the default cannot be loaded with
  torch's Adam (no apex/TE) and does not reshard across DP;
- `sharded_strategy=("torch_dist", 1)`: megatron asserts on a bare strategy string.
RNG states are per rank (`rng/rank_XXXXX.pt`), restored so a resumed run continues exactly.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

OPTIMIZER_SHARDING = "fully_reshardable"
SAVE_STRATEGY = ("torch_dist", 1)
# No per-sub-optimizer key prefix: the dense and expert optimizers are chained only when EP > 1, so
# prefixed keys would tie the optimizer state to the EP size.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": OPTIMIZER_SHARDING, "chained_optim_avoid_prefix": True}


def _model_sharded_state(handle) -> dict:
    chunks = handle.unwrapped_chunks()
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    # megatron's convention for virtual pipeline chunks
    return {f"model{i}": chunk.sharded_state_dict(vp_stage=i) if _takes_vp_stage(chunk) else chunk.sharded_state_dict()
            for i, chunk in enumerate(chunks)}


def _takes_vp_stage(chunk) -> bool:
    import inspect

    return "vp_stage" in inspect.signature(chunk.sharded_state_dict).parameters


def _merged_model_state(model_state: dict) -> dict:
    merged = {}
    for value in model_state.values():
        merged.update(value)
    return merged


def _full_sharded_state(engine, is_loading: bool) -> dict:
    state = _model_sharded_state(engine.handle)
    if engine.optimizer is not None:
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            _merged_model_state(state), is_loading=is_loading,
            metadata=OPTIMIZER_METADATA,
        )
        state["lr_scheduler"] = engine.scheduler.state_dict()
    return state


def save_megatron_state(engine, checkpoint_dir: str) -> None:
    """Collective: every rank calls it with the same folder (already created)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_full_sharded_state(engine, is_loading=False), checkpoint_dir, sharded_strategy=SAVE_STRATEGY)


def load_megatron_state(engine, checkpoint_dir: str, load_optimizer: bool = True) -> None:
    """Collective: load model (and optimizer + LR schedule) state into an engine of any layout."""
    from megatron.core import dist_checkpointing

    # Weights only: the optimizer is not asked for its sharded state at all. Asking (is_loading=True)
    # initialises its states for the load (Adam's step counter included), so a model-only resume
    # would take its first update with other bias corrections than a fresh run.
    state = _full_sharded_state(engine, is_loading=True) if load_optimizer else _model_sharded_state(engine.handle)
    loaded = dist_checkpointing.load(state, checkpoint_dir)
    chunks = engine.handle.unwrapped_chunks()
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key])
    if "optimizer" in state:
        engine.optimizer.load_state_dict(loaded["optimizer"])
        engine.scheduler.load_state_dict(loaded["lr_scheduler"])
        # The optimizer's fp32 main params were reloaded; make the model params equal them again.
        if hasattr(engine.optimizer, "reload_model_params"):
            engine.optimizer.reload_model_params()


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron_tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def save_rng_state(checkpoint_root: str, rank: int) -> None:
    folder = os.path.join(checkpoint_root, "rng")
    os.makedirs(folder, exist_ok=True)
    torch.save(rng_state(), os.path.join(folder, f"rank_{rank:05d}.pt"))


def load_rng_state(checkpoint_root: str, rank: int) -> bool:
    """Restore this rank's RNG state if the checkpoint has one for it (same world size)."""
    path = os.path.join(checkpoint_root, "rng", f"rank_{rank:05d}.pt")
    if not os.path.exists(path):
        return False  # resumed at another world size: RNG streams restart from the seed
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        set_rng_state(torch.load(path, weights_only=True))
    return True


def _numpy_rng_globals() -> list:
    """What unpickling `np.random.get_state()` (a uint32 array) needs beyond torch's safe types."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
