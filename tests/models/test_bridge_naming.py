"""The local-spec <-> TE-spec parameter-name translation (pure strings, no megatron)."""

import pytest

from megarl.models.naming import bridge_name_map, is_moe_expert_name, split_expert_name

MOE_LAYER = [
    "decoder.layers.3.input_layernorm.weight",
    "decoder.layers.3.self_attention.linear_qkv.weight",
    "decoder.layers.3.self_attention.linear_qkv._extra_state",
    "decoder.layers.3.self_attention.q_layernorm.weight",
    "decoder.layers.3.self_attention.k_layernorm.weight",
    "decoder.layers.3.self_attention.linear_proj.weight",
    "decoder.layers.3.pre_mlp_layernorm.weight",
    "decoder.layers.3.mlp.router.weight",
    "decoder.layers.3.mlp.experts.local_experts.0.linear_fc1.weight",
    "decoder.layers.3.mlp.experts.local_experts.11.linear_fc2.weight",
]
DENSE_LAYER = [
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
]
OUTER = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]


def test_local_spec_names_become_te_names():
    mapping = bridge_name_map(MOE_LAYER + DENSE_LAYER + OUTER, "local")
    assert mapping == {
        "decoder.layers.3.input_layernorm.weight": "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.3.self_attention.linear_qkv.weight": "decoder.layers.3.self_attention.linear_qkv.weight",
        "decoder.layers.3.self_attention.q_layernorm.weight": "decoder.layers.3.self_attention.q_layernorm.weight",
        "decoder.layers.3.self_attention.k_layernorm.weight": "decoder.layers.3.self_attention.k_layernorm.weight",
        "decoder.layers.3.self_attention.linear_proj.weight": "decoder.layers.3.self_attention.linear_proj.weight",
        # MoE layer: TE keeps a separate pre-MLP norm (it cannot fuse into the router).
        "decoder.layers.3.pre_mlp_layernorm.weight": "decoder.layers.3.pre_mlp_layernorm.weight",
        "decoder.layers.3.mlp.router.weight": "decoder.layers.3.mlp.router.weight",
        "decoder.layers.3.mlp.experts.local_experts.0.linear_fc1.weight": "decoder.layers.3.mlp.experts.linear_fc1.weight0",
        "decoder.layers.3.mlp.experts.local_experts.11.linear_fc2.weight": "decoder.layers.3.mlp.experts.linear_fc2.weight11",
        "decoder.layers.0.input_layernorm.weight": "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        # Dense layer: the pre-MLP norm is fused into fc1 in TE.
        "decoder.layers.0.pre_mlp_layernorm.weight": "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.0.mlp.linear_fc1.weight": "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight": "decoder.layers.0.mlp.linear_fc2.weight",
        "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
        "decoder.final_layernorm.weight": "decoder.final_layernorm.weight",
        "output_layer.weight": "output_layer.weight",
    }


def test_nested_torch_norm_level_and_layernorm_bias():
    mapping = bridge_name_map(
        ["decoder.layers.1.input_layernorm.norm.weight", "decoder.layers.1.input_layernorm.norm.bias",
         "decoder.layers.1.self_attention.q_layernorm.norm.weight", "decoder.final_layernorm.norm.weight"],
        "local",
    )
    assert list(mapping.values()) == [
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_bias",
        "decoder.layers.1.self_attention.q_layernorm.weight",
        "decoder.final_layernorm.weight",
    ]


def test_te_spec_is_identity_and_rejects_per_expert_modules():
    te_names = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.0.mlp.experts.linear_fc1.weight3"]
    assert bridge_name_map(te_names, "te") == {n: n for n in te_names}
    with pytest.raises(ValueError, match="moe_grouped_gemm"):
        bridge_name_map(["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"], "te")
    with pytest.raises(ValueError, match="'te' or 'local'"):
        bridge_name_map([], "apex")


def test_collision_is_an_error():
    with pytest.raises(ValueError, match="both translate to"):
        bridge_name_map(
            ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"],
            "local",
        )


def test_expert_name_helpers():
    assert is_moe_expert_name("decoder.layers.2.mlp.experts.linear_fc2.weight7")
    assert not is_moe_expert_name("decoder.layers.2.mlp.router.weight")
    assert split_expert_name("decoder.layers.2.mlp.experts.linear_fc2.weight17") == ("decoder.layers.2.mlp.experts.linear_fc2.weight", 17)
    with pytest.raises(ValueError):
        split_expert_name("decoder.layers.2.mlp.router.weight")
