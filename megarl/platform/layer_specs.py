"""Transformer layer specs for the device we run on.

On CUDA with TransformerEngine importable: megatron's TE spec, unchanged. Otherwise megatron's local
(pure megatron-core) spec with two modules swapped in:

- `SequenceParallelTorchNorm` for every norm: torch's LayerNorm/RMSNorm whose parameters carry the
  `sequence_parallel` attribute like apex's fused norm does, so `finalize_model_grads` all-reduces
  their gradients over TP. megatron's own `WrappedTorchNorm` asserts `not config.sequence_parallel`,
  and MoE with TP>1 requires sequence parallelism. Parameter names are those of the local spec
  (`input_layernorm.weight`, ...), as with WrappedTorchNorm.
- `TorchCoreAttention` (megarl.platform.attention) for the core attention: supports CP>1 and packed
  THD sequences, which megatron's local DotProductAttention refuses.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megarl.platform.attention import TorchCoreAttention
from megarl.platform.device import accelerator_available


class SequenceParallelTorchNorm:
    """torch LayerNorm / RMSNorm (per `config.normalization`) usable with sequence parallelism.

    Same constructor as megatron's norms; returns a plain `torch.nn.LayerNorm`/`RMSNorm` whose
    parameters are tagged `sequence_parallel = config.sequence_parallel`.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str | None = None):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise NotImplementedError("zero-centered gamma needs TransformerEngine or apex norms")
        kind = config.normalization
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise NotImplementedError(f"normalization {kind!r}: only LayerNorm and RMSNorm are implemented")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


@functools.lru_cache(maxsize=None)
def uses_transformer_engine() -> bool:
    """True when layer specs are built from TransformerEngine modules (CUDA + TE importable)."""
    if not accelerator_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _local_norm_classes() -> tuple[type, ...]:
    classes = [WrappedTorchNorm]
    try:  # with apex installed megatron's local spec picks apex's FusedLayerNorm (CUDA-only)
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        classes.append(FusedLayerNorm)
    except ImportError:
        pass
    return tuple(classes)


def _swap_local_modules(node, norms: tuple[type, ...]):
    """Replace local norms and DotProductAttention in a (deep-copied) spec tree, in place."""
    if isinstance(node, type):
        if node in norms:
            return SequenceParallelTorchNorm
        if node is DotProductAttention:
            return TorchCoreAttention
        return node
    if isinstance(node, ModuleSpec):
        node.module = _swap_local_modules(node.module, norms)
        node.submodules = _swap_local_modules(node.submodules, norms)
        return node
    if dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            setattr(node, field.name, _swap_local_modules(getattr(node, field.name), norms))
        return node
    if isinstance(node, list):
        return [_swap_local_modules(item, norms) for item in node]
    return node


def gpt_decoder_block_spec(config, vp_stage: int | None = None):
    """Decoder block spec (`TransformerBlockSubmodules`) for the layers of this PP/VPP stage.

    `config` is the model's TransformerConfig; `vp_stage` the virtual-pipeline chunk index.
    """
    if uses_transformer_engine():
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    spec = copy.deepcopy(get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage))
    return _swap_local_modules(spec, _local_norm_classes())
