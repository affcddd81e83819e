"""mbridge (HF <-> megatron-core name and layout mapping) adapted to megarl's platform layer.

mbridge 0.15.1 knows how HF tensors become megatron tensors (QKV interleaving, gate/up fusion,
TP/ETP slicing, EP expert offsets), but it assumes a GPU: it builds TransformerEngine layer specs,
reads `hf_config.rope_theta` (moved to `rope_parameters` in transformers 5) and names parameters the
TE way. `make_bridge` returns an unmodified mbridge object with three instance-level adjustments:

- its layer-spec hook returns `megarl.platform.layer_specs.gpt_decoder_block_spec` (TE on CUDA,
  megatron's local spec on CPU);
- its TransformerConfig gets `megarl.platform.transformer_config_overrides(layout)` (parallel sizes,
  sequence parallelism, no fusions on CPU, ...) and the model facts mbridge leaves out (Qwen3-MoE
  `norm_topk_prob`);
- the HF config it reads carries `rope_theta` again.

`BridgeNamedChunk` shows a model chunk to mbridge under TE names (see `megarl.models.naming`), so
mbridge's own `load_weights` slices HF tensors into the local spec's parameters.
Nothing in site-packages is edited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from megarl.models.naming import LayerSpecKind, bridge_name_map

if TYPE_CHECKING:
    from mbridge.core.bridge import Bridge

    from megarl.distributed import ParallelLayout


def load_hf_config_for_bridge(hf_dir: str):
    """The folder's HF config, checked for what megarl's mbridge path supports, with `rope_theta` set.

    Raises NotImplementedError (before any model is built) for what mbridge 0.15.1 would silently
    build wrong or leave unmapped: RoPE scaling, sliding windows, Qwen3 attention biases, Qwen3-MoE
    dense layers between MoE layers.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(hf_dir)
    if getattr(hf_config, "rope_theta", None) is None:
        rope = getattr(hf_config, "rope_parameters", None) or {}
        if "rope_theta" not in rope:
            raise ValueError(f"{hf_dir}/config.json has neither rope_theta nor rope_parameters.rope_theta")
        hf_config.rope_theta = rope["rope_theta"]
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(
            f"RoPE scaling {rope_type!r} in {hf_dir}: the mbridge path builds plain RoPE only; "
            "remove rope scaling from the config or add it to megarl.models.bridge"
        )
    if getattr(hf_config, "use_sliding_window", False):
        raise NotImplementedError(f"{hf_dir}: sliding-window attention is not built by the mbridge path")
    if hf_config.model_type in ("qwen3", "qwen3_moe") and getattr(hf_config, "attention_bias", False):
        raise NotImplementedError(f"{hf_dir}: mbridge's Qwen3 mapping has no q/k/v biases (attention_bias=true)")
    if hf_config.model_type == "qwen3_moe":
        if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
            raise NotImplementedError(
                "Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not mapped by "
                "mbridge 0.15.1; every layer must be an MoE layer"
            )
    return hf_config


def _model_specific_config(hf_config) -> dict[str, Any]:
    """TransformerConfig fields mbridge 0.15.1 sets wrongly or not at all for this model."""
    if hf_config.model_type == "qwen3_moe":
        # norm_topk_prob=True: softmax over the top-k logits (= renormalised top-k probabilities),
        # which is megatron's pre_softmax=False; False: softmax over all experts, then top-k.
        return {"moe_router_pre_softmax": not getattr(hf_config, "norm_topk_prob", True)}
    return {}


def _pin_output_layer_mapping(bridge: "Bridge", hf_config) -> None:
    """Give this bridge its own `output_layer.weight` -> HF name entry.

    mbridge's Qwen2/Qwen3 bridges record tied embeddings by writing into the class-level mapping
    dict, so after one tied model every later bridge of that class in the process (an untied actor,
    a test's next model) would load `lm_head.weight` from the embedding; the MoE bridges never map
    tied embeddings at all. An instance-level copy avoids both.
    """
    mapping = dict(bridge._DIRECT_MAPPING)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    mapping["output_layer.weight"] = "model.embed_tokens.weight" if tied else "lm_head.weight"
    bridge._DIRECT_MAPPING = mapping


def make_bridge(
    hf_dir: str,
    layout: "ParallelLayout",
    *,
    hf_config=None,
    dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> "Bridge":
    """An mbridge Bridge for `hf_dir` whose TransformerConfig and layer specs fit this device and layout.

    Needs megatron's parallel state initialised for `layout` (mbridge reads TP/PP/EP sizes from it).
    `hf_config` is `load_hf_config_for_bridge(hf_dir)` if the caller has it already.
    `config_overrides` are applied last (any TransformerConfig field, e.g. recompute settings).
    """
    from mbridge import AutoBridge

    from megarl.platform import transformer_config_overrides
    from megarl.platform.layer_specs import gpt_decoder_block_spec

    hf_config = hf_config if hf_config is not None else load_hf_config_for_bridge(hf_dir)
    supported = AutoBridge.list_supported_models()
    if hf_config.model_type not in supported:
        raise ValueError(f"model_type {hf_config.model_type!r} has no mbridge mapping; supported: {sorted(supported)}")
    bridge = AutoBridge.from_config(hf_config, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    _pin_output_layer_mapping(bridge, hf_config)
    is_moe = bool(getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None))
    # Later sources win: model facts, then the device/layout, then the caller's explicit overrides.
    bridge.set_extra_args(**{
        **_model_specific_config(hf_config),
        **transformer_config_overrides(layout, is_moe=is_moe),
        **(config_overrides or {}),
    })

    def layer_spec(vp_stage: int | None = None):
        return gpt_decoder_block_spec(bridge.config, vp_stage)

    # mbridge's provider calls this hook and, separately, reads `has_vp_stage` that its own hook sets.
    bridge._get_transformer_layer_spec = layer_spec
    bridge.has_vp_stage = True
    return bridge


def unwrap_chunk(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


class BridgeNamedChunk:
    """A model chunk as mbridge expects to see it: TE-spec parameter names, real parameter storage.

    mbridge's load/export walk `model.state_dict()` and `model.decoder.layers[i].layer_number`; this
    object offers exactly those, with names translated by `naming.bridge_name_map`. The tensors are
    the chunk's own parameters, so mbridge's in-place `copy_` writes into the model.
    """

    def __init__(self, chunk: torch.nn.Module, spec: LayerSpecKind):
        from megarl.models.value_head import is_value_model

        model = unwrap_chunk(chunk)
        self.decoder = model.decoder
        own_state = model.state_dict(keep_vars=True)
        if is_value_model(model):  # a critic's head has no mbridge mapping: see megarl.models.value_head
            own_state = {k: v for k, v in own_state.items() if not k.startswith("output_layer.")}
        self.name_map = bridge_name_map(own_state.keys(), spec)
        self._state = {self.name_map[name]: own_state[name] for name in self.name_map}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def load_hf_weights_into_chunks(bridge: "Bridge", chunks: list[torch.nn.Module], hf_dir: str, spec: LayerSpecKind) -> None:
    """Read the HF safetensors in `hf_dir` into this rank's shards of `chunks` (mbridge does TP/EP/ETP).

    Every rank of the world must call this (it scatters over TP and ETP groups).
    """
    views = [BridgeNamedChunk(chunk, spec) for chunk in chunks]
    with torch.no_grad():
        bridge.load_weights(views, hf_dir)
