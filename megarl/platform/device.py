"""Which device this run trains on, and everything that follows from it: one decision, one place.

`device_plan(requested)` is the only place that asks "is there an accelerator?" (requested =
`trainer.device`: auto | cpu | cuda). It returns a `DevicePlan`: the collective backend, the layer
spec, whether the megatron-core CPU shim applies, the ranks' resources, and — for an RL run — the
rollout settings the device forces (placement, weight transport, vLLM sleep mode, eager mode), each
with the reason. The trainer prints it once at start-up (`announce=True`); worker processes call
`device_plan()` for the same answer (a `cpu` request is handed down through MEGARL_DEVICE, which
Ray actors inherit). Everything above this layer is the same code on a laptop and on a GPU cluster.
Importing this module never imports megatron.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import torch

DEVICE_ENV = "MEGARL_DEVICE"
"""Set to "cpu" by a plan that forces the CPU, so every process the run starts decides the same."""
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_ANNOUNCED: set[str] = set()


@dataclass(frozen=True)
class Decision:
    """One setting the device layer decided: `value`, and why (the config may have asked otherwise)."""

    name: str
    value: object
    reason: str


@dataclass(frozen=True)
class DevicePlan:
    requested: str
    """trainer.device as given (auto | cpu | cuda)."""
    accelerator: bool
    """True: this process trains on CUDA devices."""
    reason: str
    """Why `accelerator` is what it is."""
    backend: str
    """torch.distributed backend: nccl with CUDA, gloo (the only CPU backend megatron-core runs on) without."""
    layer_spec: str
    """transformer_engine (CUDA + TE importable) or local (megatron-core's own modules)."""
    cpu_shim: bool
    """The megatron-core CPU shim (megarl.platform.cpu_compat) is installed by apply_device_compat()."""
    pin_memory: bool
    """Host copies (the optimizer's offloaded states) are pinned; only meaningful with CUDA."""
    cpus_per_rank: float
    gpus_per_rank: int
    engine_cpus: float
    """CPUs reserved per rollout engine bundle (fractions let small machines pack engines)."""
    placement: str | None = None
    weight_transport: str | None = None
    enable_sleep_mode: bool = False
    enforce_eager: bool = False
    threads_per_rank: int | None = None
    """torch intra-op threads per training rank; None = torch's default (one process per GPU)."""
    decisions: tuple[Decision, ...] = field(default_factory=tuple)

    def torch_threads(self, world_size: int) -> int | None:
        """Intra-op threads for one of `world_size` ranks on this machine: on CPU the ranks share the
        cores (else every rank spawns one thread per core and they thrash); None on GPU."""
        return None if self.accelerator else _cpu_threads(world_size)

    def describe(self) -> str:
        head = (f"device plan: {'cuda' if self.accelerator else 'cpu'} (trainer.device={self.requested}: "
                f"{self.reason}), "
                f"backend {self.backend}, layer spec {self.layer_spec}, cpu shim {'on' if self.cpu_shim else 'off'}")
        return "\n".join([head] + [f"  {d.name} = {d.value}: {d.reason}" for d in self.decisions])


def device_plan(requested: str | None = None, *, placement: str | None = None, transport: str = "auto",
                enforce_eager: bool = False, train_ranks: int | None = None, announce: bool = False) -> DevicePlan:
    """Decide the device for `requested` (trainer.device; None = what this run's driver decided,
    MEGARL_DEVICE, else auto). With `placement` (rollout.placement) the rollout settings are decided
    too: `transport` (rollout.weight_sync.transport, auto = by placement and device), `enforce_eager`
    (rollout.enforce_eager). `train_ranks` adds the threads-per-rank decision. `announce` prints the
    plan, once per process.

    Raises ConfigError naming trainer.device when cuda is requested and no CUDA device is visible,
    and naming rollout.weight_sync.transport when a CUDA-only transport is asked for on CPU.
    """
    from megarl.config.loader import ConfigError

    if requested is None:
        requested = os.environ.get(DEVICE_ENV, "auto")
    if requested not in DEVICE_CHOICES:
        raise ConfigError([f"trainer.device: {requested!r} is not one of {', '.join(DEVICE_CHOICES)}"])
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ConfigError(["trainer.device: cuda requested but torch sees no CUDA device (torch "
                           f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           "set trainer.device=auto or cpu, or run where a GPU is visible"])
    accelerator = cuda and requested != "cpu"
    if requested == "cpu":
        os.environ[DEVICE_ENV] = "cpu"  # processes started from here (Ray actors, engines) decide the same
    decisions: list[Decision] = []
    why = (("forced, CUDA left unused" if cuda else "requested") if requested == "cpu" else
           "CUDA is visible" if accelerator else "no CUDA device is visible")
    layer_spec = "local"
    if accelerator and importlib.util.find_spec("transformer_engine") is not None:
        layer_spec = "transformer_engine"
    pin = accelerator
    decisions.append(Decision("pin_memory", pin, "pinned host copies speed up device copies" if pin
                              else "no device copies to speed up (pinning needs CUDA)"))
    plan = dict(requested=requested, accelerator=accelerator, reason=why, backend="nccl" if accelerator else "gloo",
                layer_spec=layer_spec, cpu_shim=not accelerator, pin_memory=pin,
                cpus_per_rank=1.0 if accelerator else 0.5, gpus_per_rank=1 if accelerator else 0,
                engine_cpus=1.0 if accelerator else 0.5)
    if train_ranks:
        threads = None if accelerator else _cpu_threads(train_ranks)
        decisions.append(Decision("threads_per_rank", threads or "torch default",
                                  f"{train_ranks} CPU ranks share {os.cpu_count()} cores" if threads
                                  else "one process per GPU"))
        plan["threads_per_rank"] = threads
    if placement is not None:
        plan.update(_rollout_decisions(accelerator, placement, transport, enforce_eager, decisions))
    result = DevicePlan(**plan, decisions=tuple(decisions))
    if announce:
        text = result.describe()
        if text not in _ANNOUNCED:
            _ANNOUNCED.add(text)
            print(text, flush=True)
    return result


def _cpu_threads(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, world_size))


def _rollout_decisions(accelerator: bool, placement: str, transport: str, enforce_eager: bool,
                       decisions: list[Decision]) -> dict:
    from megarl.config.loader import ConfigError

    decided = placement
    if not accelerator and placement == "colocated":
        decided = "disaggregated"
        decisions.append(Decision("rollout.placement", decided, "colocated asked, but without GPUs there is "
                                  "nothing to time-share: the vLLM engines run as their own CPU processes "
                                  "(vLLM has no sleep mode on CPU)"))
    else:
        decisions.append(Decision("rollout.placement", decided, "as configured"))
    if transport == "auto":
        transport = "cuda_ipc" if accelerator and decided == "colocated" else "object_store"
        decisions.append(Decision("rollout.weight_sync.transport", transport,
                                  "auto: same-GPU engines take CUDA IPC handles" if transport == "cuda_ipc" else
                                  "auto: " + ("no CUDA, so buckets go through Ray's object store" if not accelerator
                                              else "engines on other GPUs: Ray's object store")))
    elif not accelerator and transport in ("cuda_ipc", "nccl"):
        raise ConfigError([f"rollout.weight_sync.transport: {transport} needs CUDA and this run is on CPU; "
                           "use auto or object_store"])
    else:
        decisions.append(Decision("rollout.weight_sync.transport", transport, "as configured"))
    sleep = accelerator and decided == "colocated"
    decisions.append(Decision("vllm.enable_sleep_mode", sleep,
                              "colocated on GPUs: the engines free their memory while training runs" if sleep
                              else "engines keep their own memory" + ("" if accelerator else " (no sleep mode on CPU)")))
    eager = enforce_eager or not accelerator
    decisions.append(Decision("vllm.enforce_eager", eager, "CUDA graphs need CUDA" if not accelerator and not enforce_eager
                              else "rollout.enforce_eager" if enforce_eager else "CUDA graphs captured"))
    return dict(placement=decided, weight_transport=transport, enable_sleep_mode=sleep, enforce_eager=eager)


@functools.lru_cache(maxsize=None)
def _process_plan(requested: str) -> DevicePlan:
    return device_plan(requested)


def process_plan() -> DevicePlan:
    """device_plan() for this process (the driver's decision, via MEGARL_DEVICE), computed once: the
    answer worker code asks for (hot paths such as current_device() included)."""
    return _process_plan(os.environ.get(DEVICE_ENV, "auto"))


def accelerator_available() -> bool:
    """True when this process trains on a CUDA device (the device plan's answer)."""
    return process_plan().accelerator


def collective_backend() -> str:
    """"nccl" with an accelerator, else "gloo" (the only CPU backend megatron-core works with)."""
    return process_plan().backend


def current_device() -> torch.device:
    """The device tensors of this rank live on: `cuda:<LOCAL_RANK>` (set by init) or cpu."""
    if accelerator_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apply_device_compat(skip: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Install the megatron-core CPU shim when the plan trains on CPU; no-op on GPU. Idempotent.

    Returns the names of the shim patches active after the call (empty on GPU).
    Call it before building megatron models (init_distributed does).
    """
    if not process_plan().cpu_shim:
        return []
    from megarl.platform import cpu_compat

    return cpu_compat.apply(skip=skip)
