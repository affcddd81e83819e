"""TransformerConfig fields that depend on the device and the parallel layout."""

from __future__ import annotations

from typing import Any

from megarl.platform.device import accelerator_available, collective_backend

# Kernels that exist only with CUDA / TransformerEngine / apex. All default to False in
# megatron-core 0.16.1 except where a model recipe turns them on; pinned off on CPU.
_CPU_FUSIONS_OFF = dict(
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,  # needs apex/TE's fused wgrad kernels
    cross_entropy_loss_fusion=False,
    moe_permute_fusion=False,
    moe_router_fusion=False,
    moe_grouped_gemm=False,  # grouped GEMM is a CUDA kernel; the local spec uses SequentialMLP
)


def transformer_config_overrides(layout, *, is_moe: bool = False) -> dict[str, Any]:
    """TransformerConfig keyword arguments for `layout` (a ParallelLayout) on this device.

    Parallel sizes come from the layout. On CPU: no fused kernels, CPU weight initialisation
    (also makes TP-sharded weights equal to the TP1 ones, since the master weight is drawn once and
    split). On gloo with VPP: `batch_p2p_comm=False, overlap_p2p_comm=True` -- with the default
    batched p2p (send and receive to the same peer in one batch) VPP at PP=2 is silently wrong over
    gloo. MoE with TP>1 always gets sequence parallelism (megatron requires it).
    """
    sequence_parallel = layout.uses_sequence_parallel or (is_moe and layout.tp > 1)
    overrides: dict[str, Any] = dict(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        sequence_parallel=sequence_parallel and layout.tp > 1,
        num_layers_in_last_pipeline_stage=layout.num_layers_in_last_pipeline_stage,
    )
    if not accelerator_available():
        overrides.update(_CPU_FUSIONS_OFF, use_cpu_initialization=True)
    if collective_backend() == "gloo" and layout.vpp is not None:
        overrides.update(batch_p2p_comm=False, overlap_p2p_comm=True)
    return overrides
