"""Process groups and megatron parallel state for a ParallelLayout."""

from megarl.distributed.layout import LayoutError, ModelShape, ParallelLayout, validate_layout

__all__ = ["LayoutError", "ModelShape", "ParallelLayout", "validate_layout"]
