"""Which slices of a megatron dist checkpoint become which mbridge weights, and whether an HF config
describes the checkpoint's tensors.

megatron stores every decoder weight ONCE for all layers, with the layer index as a leading axis, and
routed experts with a second (expert) axis. Names are the TE-spec names, which megatron's local spec
also writes (its `sharded_state_dict_keys_map`), with two exceptions handled here:

    checkpoint key (global shape)                                   mbridge name of slice [l] / [l, e]
    decoder.layers.self_attention.linear_qkv.weight    [L, ...]     decoder.layers.{l}.self_attention.linear_qkv.weight
    decoder.layers.mlp.linear_fc1.layer_norm_weight    [L, H]       MoE model: decoder.layers.{l}.pre_mlp_layernorm.weight
                                                                    (the local spec files the MoE pre-MLP norm under the
                                                                    dense name; TE keeps `pre_mlp_layernorm.weight`)
    decoder.layers.mlp.experts.experts.linear_fc1.weight [L, E, 2I, H]
                                                                    decoder.layers.{l}.mlp.experts.linear_fc1.weight{e}
    embedding.word_embeddings.weight, decoder.final_layernorm.weight, output_layer.weight: unchanged
    output_layer.weight [1, H] + output_layer.bias [1] (a critic's value head): HF score.weight / score.bias

The mbridge name then goes through mbridge's own `_weight_to_hf_format` (QKV split, gate/up split,
vocab un-padding): the same mapping `megarl.models.export` uses for a live model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megarl.checkpoint.convert_reader import TensorInfo
from megarl.checkpoint.store import CheckpointError
from megarl.models.value_head import VALUE_HEAD_HF_NAMES

LAYER_PREFIX = "decoder.layers."
_EXPERT_KEY = re.compile(r"^decoder\.layers\.mlp\.experts\.experts\.(?P<linear>linear_fc[12])\.(?P<kind>weight|bias)$")
_DENSE_PRE_MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
_ROUTER_KEY = "decoder.layers.mlp.router.weight"
_TOP_LEVEL_KEYS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight",
                   "output_layer.bias")
# mbridge has no mapping for a value head; these slices carry their HF name as is.
VALUE_HEAD_SLICES = {f"output_layer.{key}": hf_name for key, hf_name in VALUE_HEAD_HF_NAMES.items()}


@dataclass(frozen=True)
class SourceSlice:
    """One mbridge weight: `checkpoint_key[index]` (index = (layer,) or (layer, expert) or ())."""

    key: str
    index: tuple[int, ...]
    bridge_name: str


def is_moe_checkpoint(tensors: dict[str, TensorInfo]) -> bool:
    return _ROUTER_KEY in tensors


def _layer_bridge_name(key: str, layer: int, expert: int | None, moe: bool) -> str:
    if expert is not None:
        match = _EXPERT_KEY.match(key)
        return f"{LAYER_PREFIX}{layer}.mlp.experts.{match['linear']}.{match['kind']}{expert}"
    suffix = key[len(LAYER_PREFIX):]
    if moe and suffix == _DENSE_PRE_MLP_NORM:
        suffix = "pre_mlp_layernorm.weight"
    return f"{LAYER_PREFIX}{layer}.{suffix}"


def plan_slices(tensors: dict[str, TensorInfo], tied_embeddings: bool) -> list[SourceSlice]:
    """Every mbridge weight of the checkpoint in HF file order: embedding, layer by layer (experts in
    order), final norm, output layer. Raises CheckpointError for keys no mapping knows."""
    unknown = [k for k in tensors if not k.startswith(LAYER_PREFIX) and k not in _TOP_LEVEL_KEYS]
    if unknown:
        raise CheckpointError(f"checkpoint tensors with no HF mapping: {unknown} (MTP / vision towers are not converted)")
    moe = is_moe_checkpoint(tensors)
    layer_keys = [k for k in tensors if k.startswith(LAYER_PREFIX)]
    num_layers = {tensors[k].shape[0] for k in layer_keys}
    if len(num_layers) > 1:
        raise CheckpointError(f"layer-stacked tensors disagree on the number of layers: {sorted(num_layers)}")
    slices = []
    if "embedding.word_embeddings.weight" in tensors:
        slices.append(SourceSlice("embedding.word_embeddings.weight", (), "embedding.word_embeddings.weight"))
    for layer in range(num_layers.pop() if num_layers else 0):
        for key in layer_keys:
            if _EXPERT_KEY.match(key):
                for expert in range(tensors[key].shape[1]):
                    slices.append(SourceSlice(key, (layer, expert), _layer_bridge_name(key, layer, expert, moe)))
            else:
                slices.append(SourceSlice(key, (layer,), _layer_bridge_name(key, layer, None, moe)))
    if "decoder.final_layernorm.weight" in tensors:
        slices.append(SourceSlice("decoder.final_layernorm.weight", (), "decoder.final_layernorm.weight"))
    if is_value_checkpoint(tensors):
        slices.extend(SourceSlice(key, (), hf_name) for key, hf_name in VALUE_HEAD_SLICES.items())
    elif "output_layer.bias" in tensors:
        raise CheckpointError("checkpoint has output_layer.bias but output_layer.weight is not a [1, hidden] value head")
    elif "output_layer.weight" in tensors and not tied_embeddings:
        slices.append(SourceSlice("output_layer.weight", (), "output_layer.weight"))
    return slices


def is_value_checkpoint(tensors: dict[str, TensorInfo]) -> bool:
    """A critic: its output layer is a value head (one output with a bias), not vocabulary logits."""
    head = tensors.get("output_layer.weight")
    return head is not None and head.shape[0] == 1 and "output_layer.bias" in tensors


def check_config_matches(tensors: dict[str, TensorInfo], hf_config, config_source: str) -> None:
    """Raise CheckpointError naming every field of the HF config that contradicts the tensors' shapes."""
    problems: list[str] = []

    def expect(field: str, config_value, tensor_value, key: str) -> None:
        if config_value != tensor_value:
            problems.append(f"{field}={config_value} in the config but {tensor_value} in {key} {tensors[key].shape}")

    c = hf_config
    embed = tensors.get("embedding.word_embeddings.weight")
    if embed is not None:
        expect("hidden_size", c.hidden_size, embed.shape[1], embed.key)
        if embed.shape[0] < c.vocab_size:
            problems.append(f"vocab_size={c.vocab_size} in the config but only {embed.shape[0]} rows in {embed.key}")
    qkv = tensors.get("decoder.layers.self_attention.linear_qkv.weight")
    if qkv is not None:
        expect("num_hidden_layers", c.num_hidden_layers, qkv.shape[0], qkv.key)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        expect("(num_attention_heads + 2 * num_key_value_heads) * head_dim",
               (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim, qkv.shape[1], qkv.key)
        expect("hidden_size", c.hidden_size, qkv.shape[2], qkv.key)
    config_experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or 0
    fc2_key = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    if fc2_key in tensors:
        expect("num_experts", config_experts, tensors[fc2_key].shape[1], fc2_key)
        expect("moe_intermediate_size", getattr(c, "moe_intermediate_size", None), tensors[fc2_key].shape[3], fc2_key)
    elif config_experts:
        problems.append(f"num_experts={config_experts} in the config but the checkpoint has no routed experts")
    dense_fc2 = "decoder.layers.mlp.linear_fc2.weight"
    if dense_fc2 in tensors:
        expect("intermediate_size", getattr(c, "intermediate_size", None), tensors[dense_fc2].shape[2], dense_fc2)
    if problems:
        raise CheckpointError(
            f"HF config {config_source} does not match the checkpoint: " + "; ".join(problems)
            + " (pass --hf-config with the config of the model that was trained)"
        )
