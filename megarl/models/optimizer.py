"""Megatron optimizer and learning-rate schedule for the actor.

`build_optimizer(chunks, options)` returns megatron's own optimizer (`get_megatron_optimizer`: Adam
or AdamW, optional distributed optimizer, grad clipping, optional CPU offload) and its
`OptimizerParamScheduler` (linear warmup, then constant / cosine / linear decay to `min_lr`).

CPU offload on a machine without an accelerator: megatron's `HybridDeviceOptimizer` decides what to
offload by `param.is_cuda`, so on CPU nothing counts as device memory, nothing is offloaded, its
CPU-copy maps stay empty and the step fails looking parameters up in them. `HostCopyHybridOptimizer`
keeps megatron's partition, grad copy and copy-back logic and changes only that decision: without an
accelerator every parameter counts as "device" and its offloaded copy is a separate host tensor, so
the same code paths run (and are tested) here as on a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from megarl.config.schema import OptimizerConfig
from megarl.platform.device import accelerator_available, process_plan

LR_DECAY_STYLES = ("constant", "cosine", "linear")
_CONFIG = OptimizerConfig()  # the one place the defaults of the fields that come from the config live


@dataclass
class OptimizerOptions:
    """Optimizer and schedule settings (units: learning rates absolute, steps = optimizer steps)."""

    optimizer: str = "adam"  # "adam" (AdamW when weight_decay is decoupled) or "sgd"
    lr: float = _CONFIG.lr
    min_lr: float = _CONFIG.min_lr
    weight_decay: float = _CONFIG.weight_decay
    adam_beta1: float = _CONFIG.adam_beta1
    adam_beta2: float = _CONFIG.adam_beta2
    adam_eps: float = _CONFIG.adam_eps
    clip_grad: float = _CONFIG.clip_grad  # max global grad norm; 0 disables clipping
    lr_warmup_steps: int = _CONFIG.lr_warmup_steps
    lr_warmup_init: float = 0.0  # lr at step 0 of the warmup
    lr_decay_steps: int | None = _CONFIG.lr_decay_steps  # default: warmup + 1 (constant after warmup)
    lr_decay_style: str = _CONFIG.lr_decay_style
    use_distributed_optimizer: bool = _CONFIG.use_distributed_optimizer
    bf16: bool = False  # from model.dtype
    optimizer_cpu_offload: bool = _CONFIG.optimizer_cpu_offload
    optimizer_offload_fraction: float = _CONFIG.optimizer_offload_fraction  # share of parameters (by numel) updated on CPU
    overlap_cpu_optimizer_d2h_h2d: bool = _CONFIG.overlap_cpu_optimizer_d2h_h2d
    use_precision_aware_optimizer: bool = _CONFIG.use_precision_aware_optimizer

    @classmethod
    def from_config(cls, optimizer: OptimizerConfig, *, total_optimizer_steps: int, bf16: bool) -> "OptimizerOptions":
        """From megarl.config's OptimizerConfig (`optimizer` or `critic.optimizer`). The LR schedule
        decays over `lr_decay_steps`, or else over the run's `total_optimizer_steps` (at least one
        step past the warmup); `bf16` = model.dtype is bf16."""
        o = optimizer
        return cls(
            lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps, clip_grad=o.clip_grad, lr_warmup_steps=o.lr_warmup_steps,
            lr_decay_steps=o.lr_decay_steps or max(total_optimizer_steps, o.lr_warmup_steps + 1),
            lr_decay_style=o.lr_decay_style, use_distributed_optimizer=o.use_distributed_optimizer, bf16=bf16,
            optimizer_cpu_offload=o.optimizer_cpu_offload, optimizer_offload_fraction=o.optimizer_offload_fraction,
            overlap_cpu_optimizer_d2h_h2d=o.overlap_cpu_optimizer_d2h_h2d,
            use_precision_aware_optimizer=o.use_precision_aware_optimizer,
        )

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            raise ValueError(f"optimizer_offload_fraction must be in [0, 1], got {self.optimizer_offload_fraction}")
        if self.optimizer_cpu_offload and self.use_distributed_optimizer and not self.bf16:
            # The distributed optimizer hands fp32 parameters to its inner optimizer as views of the
            # grad buffer; the offload optimizer is rebuilt from them and torch refuses non-leaf
            # tensors ("can't optimize a non-leaf Tensor"). With bf16 params the shards are fp32 clones.
            raise ValueError(
                "optimizer_cpu_offload with use_distributed_optimizer needs bf16=True (fp32 parameters "
                "cannot be offloaded by megatron's distributed optimizer); or turn one of them off"
            )
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.lr_warmup_steps:
            raise ValueError(
                f"lr_decay_steps ({self.lr_decay_steps}) must exceed lr_warmup_steps ({self.lr_warmup_steps})"
            )

    def megatron_config(self):
        from megatron.core.optimizer import OptimizerConfig

        return OptimizerConfig(
            optimizer=self.optimizer, lr=self.lr, min_lr=self.min_lr, weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2, adam_eps=self.adam_eps,
            clip_grad=self.clip_grad, use_distributed_optimizer=self.use_distributed_optimizer,
            bf16=self.bf16, params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            optimizer_cpu_offload=self.optimizer_cpu_offload,
            optimizer_offload_fraction=self.optimizer_offload_fraction if self.optimizer_cpu_offload else 0.0,
            overlap_cpu_optimizer_d2h_h2d=self.overlap_cpu_optimizer_d2h_h2d,
            use_precision_aware_optimizer=self.use_precision_aware_optimizer,
            pin_cpu_grads=process_plan().pin_memory, pin_cpu_params=process_plan().pin_memory,
        )


def build_optimizer(chunks: list[torch.nn.Module], options: OptimizerOptions):
    """(megatron optimizer, OptimizerParamScheduler) for DDP-wrapped model chunks."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if options.use_precision_aware_optimizer:
        import megatron.core.optimizer as optimizer_pkg

        if optimizer_pkg.USING_PYTORCH_OPTIMIZER:
            raise ValueError(
                "use_precision_aware_optimizer needs TransformerEngine's FusedAdam (it keeps optimizer "
                "state in reduced precision); TransformerEngine is not importable here, so turn it off"
            )
    with _host_copy_offload(options.optimizer_cpu_offload):
        optimizer = get_megatron_optimizer(options.megatron_config(), list(chunks))
    decay_steps = options.lr_decay_steps or options.lr_warmup_steps + 1
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=options.lr_warmup_init, max_lr=options.lr, min_lr=options.min_lr,
        lr_warmup_steps=options.lr_warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=options.lr_decay_style, start_wd=options.weight_decay,
        end_wd=options.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
    )
    return optimizer, scheduler


def _hybrid_base():
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    return HybridDeviceOptimizer


def _make_host_copy_class():
    base = _hybrid_base()

    class HostCopyHybridOptimizer(base):
        """megatron's HybridDeviceOptimizer with "is this parameter in device memory?" answered
        True for every parameter when there is no accelerator (see the module docstring). The
        offload fraction, the CPU copies, the grad copies and the copy-back hook are megatron's."""

        def _get_sub_optimizer_param_groups(self, offload_fraction: float):
            if accelerator_available():
                return super()._get_sub_optimizer_param_groups(offload_fraction)
            params = [p for group in self.param_groups for p in group["params"]]
            threshold = sum(p.numel() for p in params) * offload_fraction
            offloaded = 0
            cpu_groups, device_groups = [], []
            device_to_copy, copy_to_device, to_fp32 = {}, {}, {}
            for group in self.param_groups:
                device_group, cpu_group = {**group, "params": []}, {**group, "params": []}
                for orig in group["params"]:
                    param, is_copy = orig, False
                    if offloaded < threshold:
                        param = orig.detach().clone()  # the "host" copy the CPU optimizer updates
                        offloaded += param.numel()
                        is_copy = True
                    if self.param_update_in_fp32 and param.dtype != torch.float32:
                        param = param.detach().clone().float()
                        to_fp32[orig] = param
                    if is_copy:
                        device_to_copy[orig] = param
                        copy_to_device[param] = orig
                    (cpu_group if is_copy else device_group)["params"].append(param)
                if device_group["params"]:
                    device_groups.append(device_group)
                if cpu_group["params"]:
                    cpu_groups.append(cpu_group)
            return cpu_groups, device_groups, device_to_copy, copy_to_device, to_fp32

    return HostCopyHybridOptimizer


_HOST_COPY_CLASS = None


@contextlib.contextmanager
def _host_copy_offload(enabled: bool):
    """While megatron builds the optimizer, let its HybridDeviceOptimizer name our subclass (both
    where get_megatron_optimizer constructs it and where the distributed optimizer rebuilds it).
    isinstance checks against the original class keep working afterwards."""
    global _HOST_COPY_CLASS
    if not enabled or accelerator_available():
        yield
        return
    import megatron.core.optimizer as optimizer_pkg
    import megatron.core.optimizer.distrib_optimizer as distrib

    if _HOST_COPY_CLASS is None:
        _HOST_COPY_CLASS = _make_host_copy_class()
    saved = optimizer_pkg.HybridDeviceOptimizer, distrib.HybridDeviceOptimizer
    optimizer_pkg.HybridDeviceOptimizer = distrib.HybridDeviceOptimizer = _HOST_COPY_CLASS
    try:
        yield
    finally:
        optimizer_pkg.HybridDeviceOptimizer, distrib.HybridDeviceOptimizer = saved


def offloaded_fraction(optimizer) -> float:
    """Share of this rank's optimizer parameters (by numel) whose update runs in host memory."""
    base = _hybrid_base()
    offloaded = total = 0
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        total += sum(p.numel() for p in params)
        if isinstance(inner, base):
            offloaded += sum(p.numel() for opt in inner.cpu_optimizers for g in opt.param_groups for p in g["params"])
    return offloaded / total if total else 0.0


def current_lr(optimizer) -> float:
    """The learning rate of the first parameter group (all groups share it unless overridden)."""
    return float(optimizer.param_groups[0]["lr"])
