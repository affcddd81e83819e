"""Dry-run planner: parameter counts from a HF config.json, layout checks, per-GPU memory plan."""

from megarl.planner.memory import MemoryAssumptions, MemoryPlan, ParallelSizes, estimate_memory, stage_layer_counts
from megarl.planner.model_stats import SUPPORTED_MODEL_TYPES, ModelStats, load_hf_config
from megarl.planner.plan import RunPlan, format_plan, parallel_layout, plan_run

__all__ = [
    "MemoryAssumptions", "MemoryPlan", "ModelStats", "ParallelSizes", "RunPlan", "SUPPORTED_MODEL_TYPES",
    "estimate_memory", "format_plan", "load_hf_config", "parallel_layout", "plan_run", "stage_layer_counts",
]
