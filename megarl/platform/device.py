"""Which device and collective backend this process trains on.

The only place that asks "is there an accelerator?". Everything above this layer is the same code
on a laptop and on a GPU cluster; on a CPU-only machine `apply_device_compat()` installs the
megatron-core CPU shim (`megarl.platform.cpu_compat`). Importing this module never imports megatron.
"""

from __future__ import annotations

import torch


def accelerator_available() -> bool:
    """True when a CUDA device is usable by this process."""
    return torch.cuda.is_available()


def collective_backend() -> str:
    """"nccl" with an accelerator, else "gloo" (the only CPU backend megatron-core works with)."""
    return "nccl" if accelerator_available() else "gloo"


def current_device() -> torch.device:
    """The device tensors of this rank live on: `cuda:<LOCAL_RANK>` (set by init) or cpu."""
    if accelerator_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apply_device_compat(skip: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Install the megatron-core CPU shim when CUDA is absent; no-op on GPU. Idempotent.

    Returns the names of the shim patches active after the call (empty on GPU).
    Call it before building megatron models (init_distributed does).
    """
    if accelerator_available():
        return []
    from megarl.platform import cpu_compat

    return cpu_compat.apply(skip=skip)
