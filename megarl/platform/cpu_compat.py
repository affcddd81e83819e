"""Make megatron-core 0.16.1 run on a CPU-only torch build over gloo.

megatron-core assumes CUDA in a dozen places (device literals, CUDA RNG, streams, pinned memory,
tensor type names) and has a few gloo-incompatible or CPU-only bugs. Each patch below is one small
named installer: its docstring says which megatron-core behaviour it covers and what fails without
it; it returns an `undo` callable so tests can switch single patches off and watch megatron fail.

    from megarl.platform import cpu_compat
    cpu_compat.apply()                    # all patches (no-op when CUDA is available)
    cpu_compat.revert(); cpu_compat.apply(skip=("pin_memory",))   # ablation in tests

Megatron is imported lazily inside the installers that patch its modules.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
Undo = Callable[[], None]
PATCHES: dict[str, Callable[[], Undo]] = {}  # name -> installer, in application order
_applied: dict[str, Undo] = {}


def _patch(name: str):
    def register(installer: Callable[[], Undo]) -> Callable[[], Undo]:
        PATCHES[name] = installer
        return installer

    return register


def _set_attrs(obj, **values) -> Undo:
    """setattr each value on obj; the returned callable restores the previous attributes."""
    missing = object()
    old = {name: getattr(obj, name, missing) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)

    def undo():
        for name, value in old.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)

    return undo


# ---------------------------------------------------------------------------------------------
# One TorchFunctionMode carries the patches that must see every torch call (device literals,
# pin_memory, tensor type names). Each patch turns one of its switches on. torch pops a mode while
# its handler runs, so code inside a `torch.autograd.backward` issued through the mode runs without
# it; megatron-core 0.16.1 creates tensors there only via `torch.cuda.current_device()`, which the
# `cuda_device_queries` patch answers with a real CPU device (tests/distributed/
# test_parallel_equivalence.py trains with activation recompute and megatron's custom_backward).
# ---------------------------------------------------------------------------------------------


def _to_cpu_device(device):
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.switches: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        on = self.switches
        if "device_literals" in on:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
                args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if "pin_memory" in on:
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is torch.Tensor.pin_memory:
                return args[0]
        if "cuda_type_names" in on and func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_mode = _CudaToCpuMode()


def _mode_switch(name: str) -> Undo:
    if not _mode.switches:
        _mode.__enter__()
    _mode.switches.add(name)

    def undo():
        _mode.switches.discard(name)
        if not _mode.switches:
            _mode.__exit__(None, None, None)

    return undo


@_patch("device_literals")
def _device_literals() -> Undo:
    """Map `device="cuda"`, `device=<int>` and `.cuda()` / `.to("cuda")` to the CPU.

    megatron-core creates tensors on hard-coded CUDA devices, e.g. `torch.zeros([], device="cuda")`
    for the token count in pipeline_parallel/schedules.py and `torch.tensor([0.0], device='cuda')`
    for `found_inf` in optimizer/optimizer.py. Without it: "AssertionError: Torch not compiled with
    CUDA enabled" when the megatron optimizer is built.
    """
    return _mode_switch("device_literals")


@_patch("pin_memory")
def _pin_memory() -> Undo:
    """Drop `pin_memory=True` and make `Tensor.pin_memory()` a no-op.

    A CPU-only torch has no pinned-memory allocator; megatron pins e.g. the context-parallel
    position index in models/common/embeddings/rope_utils.py (`get_pos_emb_on_this_cp_rank`).
    Without it: "RuntimeError: pin_memory=True requires a CUDA or other accelerator backend".
    """
    return _mode_switch("pin_memory")


@_patch("cuda_type_names")
def _cuda_type_names() -> Undo:
    """Report CPU tensors' `Tensor.type()` under the CUDA name ("torch.cuda.FloatTensor").

    megatron dispatches on type-name strings: `clip_grad_by_total_norm_fp32` asserts
    `param.type() == 'torch.cuda.FloatTensor'` (optimizer/clip_grads.py), and the fp16/bf16/fp32
    parameter grouping of the (distributed) optimizer compares the same strings. Without it:
    a bare AssertionError in clip_grads.py on the first optimizer step with gradient clipping.
    """
    return _mode_switch("cuda_type_names")


# ---------------------------------------------------------------------------------------------
# torch.cuda module functions
# ---------------------------------------------------------------------------------------------


@_patch("cuda_device_queries")
def _cuda_device_queries() -> Undo:
    """`torch.cuda.current_device()` returns the CPU device; `torch.cuda.synchronize()` is a no-op.

    megatron passes `device=torch.cuda.current_device()` everywhere (e.g. the grad buffers of
    distributed/param_and_grad_buffer.py, `_gather_along_first_dim` in tensor_parallel/mappings.py).
    Returning a real `torch.device("cpu")` (not an int) also covers code that runs in autograd
    backward outside any TorchFunctionMode. Without it: "AssertionError: Torch not compiled with
    CUDA enabled" when megatron's DistributedDataParallel allocates its grad buffers.
    """
    return _set_attrs(torch.cuda, current_device=lambda: _CPU, synchronize=lambda *a, **k: None)


@_patch("cpu_rng_tracker")
def _cpu_rng_tracker() -> Undo:
    """Back megatron's CUDA RNG state tracker with the CPU generator.

    `model_parallel_cuda_manual_seed` and `CudaRNGStatesTracker.add/fork`
    (tensor_parallel/random.py) read and write the CUDA generator so that dropout and expert
    initialisation get per-TP/EP-rank streams. On CPU those streams become forks of the CPU
    generator, restored on exit exactly as megatron restores the CUDA one. Without it:
    "AssertionError: Torch not compiled with CUDA enabled" in `CudaRNGStatesTracker.add`.
    """
    import megatron.core.tensor_parallel.random as mrandom

    undo_megatron = _set_attrs(
        mrandom,
        _get_cuda_rng_state=lambda *a, **k: torch.get_rng_state(),
        _set_cuda_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
    )
    undo_torch = _set_attrs(
        torch.cuda, get_rng_state=lambda *a, **k: torch.get_rng_state(), manual_seed=lambda seed: torch.manual_seed(seed)
    )
    return lambda: (undo_torch(), undo_megatron())


class _NoOpStreamOrEvent:
    """Stands in for torch.cuda.Stream / Event: every method is a no-op (CPU work is synchronous)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "record_event":
            return lambda *a, **k: _NoOpStreamOrEvent()
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@_patch("cuda_streams_events")
def _cuda_streams_events() -> Undo:
    """No-op `torch.cuda.Stream/Event/current_stream/default_stream/stream`.

    The MoE alltoall dispatcher creates a device-to-host side stream at construction
    (`MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cuda.Stream()`,
    transformer/moe/token_dispatcher.py); DDP/optimizer overlap code records events. Without it:
    "RuntimeError: torch.cuda.Stream requires CUDA support" when building a MoE layer.
    """
    stream = _NoOpStreamOrEvent()
    return _set_attrs(
        torch.cuda,
        Stream=_NoOpStreamOrEvent,
        Event=_NoOpStreamOrEvent,
        current_stream=lambda *a, **k: stream,
        default_stream=lambda *a, **k: stream,
        stream=lambda *a, **k: contextlib.nullcontext(),
    )


# ---------------------------------------------------------------------------------------------
# MoE and collectives
# ---------------------------------------------------------------------------------------------


@_patch("moe_te_general_gemm")
def _moe_te_general_gemm() -> Undo:
    """Define `moe_utils.te_general_gemm = None` when TransformerEngine is absent.

    megatron-core 0.16.1 bug: transformer/moe/moe_utils.py only defines `te_general_gemm` when TE
    imports, but `RouterGatingLinearFunction.forward` tests `te_general_gemm is not None`
    unconditionally. Without it: "NameError: name 'te_general_gemm' is not defined" in the router.
    """
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return lambda: None
    return _set_attrs(moe_utils, te_general_gemm=None)


@_patch("alltoall_split_sizes_numpy")
def _alltoall_split_sizes_numpy() -> Undo:
    """Turn CPU split-size tensors into numpy arrays, as megatron does for CUDA ones.

    The MoE alltoall dispatcher (transformer/moe/token_dispatcher.py) gets its per-rank split sizes
    from `maybe_move_tensor_to_cpu(t, as_numpy=True)`, which converts only `is_cuda` tensors; on
    CPU a torch tensor reaches `all_to_all_single(output_split_sizes=...)`. Without it (EP>1):
    "TypeError: all_to_all_single(): incompatible function arguments".
    """
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    undo_utils = _set_attrs(moe_utils, maybe_move_tensor_to_cpu=maybe_move_tensor_to_cpu)
    undo_dispatcher = _set_attrs(token_dispatcher, maybe_move_tensor_to_cpu=maybe_move_tensor_to_cpu)
    return lambda: (undo_dispatcher(), undo_utils())


@_patch("uneven_gather_scatter")
def _uneven_gather_scatter() -> Undo:
    """Re-express uneven all-gather / reduce-scatter with `all_to_all_single`.

    With expert tensor parallelism (ETP>1) the alltoall dispatcher gathers/scatters tokens over the
    ETP group with per-rank sizes (`output_split_sizes` / `input_split_sizes` of
    `_gather_along_first_dim` / `_reduce_scatter_along_first_dim` in tensor_parallel/mappings.py),
    i.e. `dist.all_gather` of unequal tensors and `dist.reduce_scatter` of a list, which gloo does
    not implement. Without it: "RuntimeError: ProcessGroupGloo::allgather: invalid tensor size".
    """
    import megatron.core.tensor_parallel.mappings as mappings

    even_gather = mappings._gather_along_first_dim
    even_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return even_gather(input_, group, output_split_sizes, use_global_buffer)
        # every rank sends its whole shard to every rank: out = cat(shard_0, ..., shard_{w-1})
        world = group.size()
        send = input_.contiguous().repeat(world, *([1] * (input_.dim() - 1)))
        out = input_.new_empty([sum(output_split_sizes), *input_.shape[1:]])
        torch.distributed.all_to_all_single(
            out, send, output_split_sizes=list(output_split_sizes), input_split_sizes=[input_.size(0)] * world, group=group
        )
        return out

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return even_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        # receive every rank's copy of my slice, then sum them
        world, rank = group.size(), group.rank()
        mine = int(input_split_sizes[rank])
        out = input_.new_empty([mine * world, *input_.shape[1:]])
        torch.distributed.all_to_all_single(
            out, input_.contiguous(), output_split_sizes=[mine] * world,
            input_split_sizes=[int(s) for s in input_split_sizes], group=group,
        )
        return out.view(world, mine, *input_.shape[1:]).sum(0)

    return _set_attrs(
        mappings,
        _gather_along_first_dim=gather_along_first_dim,
        _reduce_scatter_along_first_dim=reduce_scatter_along_first_dim,
    )


# ---------------------------------------------------------------------------------------------
# Distributed optimizer checkpoints with torch.optim.Adam (no apex / TE fused Adam)
# ---------------------------------------------------------------------------------------------


@_patch("distopt_load_only_saved_keys")
def _distopt_load_only_saved_keys() -> Undo:
    """Copy only the optimizer-state keys a checkpoint holds when loading a distributed optimizer.

    With torch's Adam, `load_state_dict` leaves a per-parameter 'step' in the state, then
    `DistributedOptimizer._set_main_param_and_optimizer_states` (optimizer/distrib_optimizer.py)
    copies every destination key from the loaded tensors, which never carry 'step'.
    Without it: "KeyError: 'step'" when resuming (fully_reshardable / dp_reshardable formats).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, tensor in destination.items():
                if key in tensors:
                    tensor.copy_(tensors[key])

    return _set_attrs(DistributedOptimizer, _set_main_param_and_optimizer_states=_set_main_param_and_optimizer_states)


@_patch("distopt_step_per_param")
def _distopt_step_per_param() -> Undo:
    """Give every parameter its own Adam 'step' after a distributed-optimizer load.

    Two megatron-core bugs with torch's Adam (optimizer/distrib_optimizer.py):
    (a) `sharded_state_dict(is_loading=True)` calls `state_dict()`, which asserts on the lazily
        created 'step' of a fresh optimizer ("AssertionError" in `state_dict`): materialise the
        state first with megatron's own `_init_optimizer_states_with_dummy_values`;
    (a') saving before the first step hits the same assertion: the state a fresh Adam starts from
        (step 0, zero moments) is written into the optimizer first;
    (b) `load_state_dict` puts ONE shared 'step' tensor on every parameter (or none), so foreach
        Adam bumps it once per parameter per step: steps go 2 -> 11 -> 20 and the bias correction
        after a resume is silently wrong. Rebuild one step tensor per parameter from the saved
        param_groups' 'step'.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_sharded_state_dict = DistributedOptimizer.sharded_state_dict
    original_load_state_dict = DistributedOptimizer.load_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        never_stepped = not any("step" in s for s in self.optimizer.state.values())
        if is_loading and never_stepped:
            self._init_optimizer_states_with_dummy_values()
        elif never_stepped and isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW):
            # Saving before the first step (a PPO actor during critic warmup): write the state a
            # fresh Adam starts from (step 0, zero moments). megatron's dummy initialisation would
            # take a real step (weight decay moves the parameters, the step count becomes 1).
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    self.optimizer.state[param] = {
                        "step": torch.zeros((), dtype=torch.float32),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return original_sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    def load_state_dict(self, state_dict):
        for state in self.optimizer.state.values():
            state.pop("step", None)
        with torch.no_grad():  # fp32 main params may be views of requires_grad model params
            original_load_state_dict(self, state_dict)
        steps = [group["step"] for group in state_dict["optimizer"]["param_groups"] if "step" in group]
        if not steps:
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if state and "exp_avg" in state:
                    state["step"] = torch.tensor(float(steps[0]))

    return _set_attrs(DistributedOptimizer, sharded_state_dict=sharded_state_dict, load_state_dict=load_state_dict)


# ---------------------------------------------------------------------------------------------


def patch_names() -> tuple[str, ...]:
    """All patch names, in application order."""
    return tuple(PATCHES)


def applied_patches() -> list[str]:
    return list(_applied)


def apply(skip: Iterable[str] = ()) -> list[str]:
    """Install every patch not in `skip` and not yet installed; no-op when CUDA is available.

    Idempotent: patches already installed stay installed (call `revert()` first to drop some).
    Returns the names of the installed patches. Unknown names in `skip` raise ValueError.
    """
    skip = set(skip)
    unknown = skip - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown cpu_compat patch(es) {sorted(unknown)}; known: {list(PATCHES)}")
    if torch.cuda.is_available() and not _applied:
        return []
    for name, install in PATCHES.items():
        if name not in skip and name not in _applied:
            _applied[name] = install()
    return applied_patches()


def revert(names: Iterable[str] | None = None) -> None:
    """Undo the given installed patches (all by default), most recently installed first."""
    targets = list(_applied) if names is None else [n for n in _applied if n in set(names)]
    for name in reversed(targets):
        _applied.pop(name)()
