"""Build megatron-core GPT models (actor or frozen reference) from a HuggingFace model folder.

    init_distributed(layout)                       # megarl.distributed, once per layout
    actor = build_megatron_model(hf_dir, layout)   # trainable, HF weights loaded into local shards
    ref = build_megatron_model(hf_dir, layout, trainable=False)

Weights go straight from the folder's safetensors into this rank's TP/PP/EP/ETP shards (no full
model is materialised anywhere). The model is fp32 unless `dtype` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from megarl.models.bridge import load_hf_config_for_bridge, load_hf_weights_into_chunks, make_bridge, unwrap_chunk
from megarl.models.naming import LayerSpecKind, current_layer_spec_kind

if TYPE_CHECKING:
    from mbridge.core.bridge import Bridge
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from megarl.distributed import ParallelLayout


@dataclass
class ModelHandle:
    """A built model and what is needed to map it back to HF.

    `chunks` has one module per virtual pipeline stage held by this rank (length 1 without VPP),
    DDP-wrapped when built with `wrap_with_ddp=True`. A handle belongs to the layout it was built
    for: after `reset_model_parallel()` its process groups are gone (export refuses it).
    """

    chunks: list[torch.nn.Module]
    bridge: "Bridge"
    config: "TransformerConfig"
    hf_config: Any
    layout: "ParallelLayout"
    hf_dir: str
    trainable: bool
    layer_spec: LayerSpecKind
    ddp_config: "DistributedDataParallelConfig | None" = field(default=None)
    value_head: bool = False  # a critic: the last stage outputs one value per position, not logits

    def unwrapped_chunks(self) -> list[torch.nn.Module]:
        """The GPTModel of each chunk, without DDP wrappers."""
        return [unwrap_chunk(chunk) for chunk in self.chunks]


def check_parallel_state_matches(layout: "ParallelLayout") -> None:
    """The model is built for megatron's current parallel state; refuse a different layout."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialised: call megarl.distributed.init_distributed(layout) first")
    actual = {
        "tp": mpu.get_tensor_model_parallel_world_size(),
        "pp": mpu.get_pipeline_model_parallel_world_size(),
        "ep": mpu.get_expert_model_parallel_world_size(),
        "etp": mpu.get_expert_tensor_parallel_world_size(),
        "cp": mpu.get_context_parallel_world_size(),
        "vpp": mpu.get_virtual_pipeline_model_parallel_world_size(),
    }
    wanted = {
        "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
        "etp": layout.expert_tensor_parallel_size,
        "cp": layout.cp, "vpp": layout.vpp,
    }
    differing = {k: (wanted[k], actual[k]) for k in wanted if wanted[k] != actual[k]}
    if differing:
        detail = ", ".join(f"{k}: layout {w} vs initialised {a}" for k, (w, a) in differing.items())
        raise ValueError(f"layout differs from megatron's parallel state ({detail}); re-run init_distributed(layout)")


def _build_chunks(bridge: "Bridge", layout: "ParallelLayout") -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage of this rank, pre/post-process set per stage."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType

    provider = bridge._model_provider([])
    if layout.pp > 1 and layout.vpp:
        chunks = [
            provider(
                pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
            )
            for stage in range(layout.vpp)
        ]
    else:
        chunks = [provider(pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage())]
    for chunk in chunks:
        chunk.model_type = ModelType.encoder_or_decoder
        # The optimizer and grad-norm code read these attributes on every parameter.
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    return chunks


def _wrap_with_ddp(chunks, config, ddp_config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    elif isinstance(ddp_config, dict):
        ddp_config = DistributedDataParallelConfig(**ddp_config)
    wrapped = [
        # Chunks after the first overlap their grad reduction with compute already: no buckets.
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    return wrapped, ddp_config


def build_megatron_model(
    hf_dir: str,
    layout: "ParallelLayout",
    *,
    load_weights: bool = True,
    trainable: bool = True,
    wrap_with_ddp: bool = False,
    ddp_config: "DistributedDataParallelConfig | dict | None" = None,
    dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    value_head: bool = False,
) -> ModelHandle:
    """A megatron-core GPTModel for the HF model in `hf_dir`, sharded for `layout` on this rank.

    Call on every rank after `init_distributed(layout)`. `trainable=False` gives a frozen reference
    model (no gradients, eval mode, never DDP-wrapped). `load_weights=False` leaves megatron's random
    initialisation (seeded by init_distributed). `ddp_config` (a DistributedDataParallelConfig or its
    fields as a dict) is used with `wrap_with_ddp`; default `grad_reduce_in_fp32=True`.
    `config_overrides` sets any other TransformerConfig field (applied last). With `dtype`
    bfloat16/float16 each chunk is wrapped in megatron's Float16Module (fp32 logits out).
    `value_head=True` builds a critic (megarl.models.value_head): the LM head is replaced by a scalar
    value head, loaded from the folder's `score.*` tensors when it has them, freshly initialised
    otherwise (e.g. a critic started from the actor's language model).
    """
    import torch.distributed as dist

    from megarl.distributed import ModelShape, validate_layout

    if wrap_with_ddp and not trainable:
        raise ValueError("wrap_with_ddp=True with trainable=False: a frozen reference model has no gradients to reduce")
    hf_config = load_hf_config_for_bridge(hf_dir)
    if value_head:
        # The value head never shares the input embedding (and with PP > 1 megatron would all-reduce
        # a tied output weight with the first stage's embedding).
        hf_config.tie_word_embeddings = False
    validate_layout(layout, dist.get_world_size(), ModelShape.from_hf_config(hf_config))
    check_parallel_state_matches(layout)

    # perform_initialization stays on even when loading: with CPU initialisation megatron sets the
    # tensor-parallel attributes of a parameter (which the export and grad-norm code read) only
    # inside its initialiser.
    bridge = make_bridge(
        hf_dir, layout, hf_config=hf_config, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        config_overrides=config_overrides,
    )
    spec = current_layer_spec_kind()
    chunks = _build_chunks(bridge, layout)
    if value_head:
        from megarl.models.value_head import attach_value_head, load_value_head

        for chunk in chunks:
            if chunk.post_process:
                attach_value_head(chunk, bridge.config)
                if load_weights:
                    load_value_head(chunk, hf_dir)
    if load_weights:
        load_hf_weights_into_chunks(bridge, chunks, hf_dir, spec)
    if dtype in (torch.bfloat16, torch.float16):
        # As megatron's own training does: half-precision modules, fp32 logits out of the last stage.
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(bridge.config, chunk) for chunk in chunks]
    if not trainable:
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
    used_ddp_config = None
    if wrap_with_ddp:
        chunks, used_ddp_config = _wrap_with_ddp(chunks, bridge.config, ddp_config)
    return ModelHandle(
        chunks=chunks, bridge=bridge, config=bridge.config, hf_config=bridge.hf_config, layout=layout,
        hf_dir=hf_dir, trainable=trainable, layer_spec=spec, ddp_config=used_ddp_config, value_head=value_head,
    )
