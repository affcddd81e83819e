"""Parameter counts from config.json: exact against transformers, and the published model sizes."""

import pytest
import torch

from megarl.planner import ModelStats
from tests.planner.hf_configs import QWEN3_30B_A3B, QWEN3_235B_A22B


def test_qwen3_235b_a22b_total_and_active():
    stats = ModelStats.from_hf_config(QWEN3_235B_A22B)
    # 235,093,634,560 is the parameter count of the released checkpoint (e.g. KerasHub's preset metadata).
    assert stats.total_params == 235_093_634_560
    assert stats.active_params == 22_190_763_520
    assert abs(stats.total_params / 235e9 - 1) < 0.01
    assert abs(stats.active_params / 22e9 - 1) < 0.01
    # model card: "Number of Parameters (Non-Embedding): 234B"
    assert int((stats.total_params - stats.embedding_params - stats.lm_head_params) / 1e9) == 233  # 233.85B


def test_qwen3_30b_a3b_total_and_active():
    stats = ModelStats.from_hf_config(QWEN3_30B_A3B)
    assert stats.total_params == 30_532_122_624  # the released checkpoint's count
    assert abs(stats.total_params / 30.5e9 - 1) < 0.01
    # the model card's "3.3B activated" is 3.353B truncated to one decimal (1.6% above 3.3B)
    assert stats.active_params == 3_353_032_704
    assert int(stats.active_params / 1e8) == 33


def _hf_numel(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe_sparse_step_tied", "qwen3", "qwen2", "qwen2_tied"])
def test_counts_equal_transformers_models(variant):
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
    config = {
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, head_dim=24, num_experts=6, num_experts_per_tok=2,
                                            moe_intermediate_size=40, tie_word_embeddings=False),
        "qwen3_moe_sparse_step_tied": lambda: Qwen3MoeConfig(
            **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            decoder_sparse_step=2, mlp_only_layers=[3], tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**common, head_dim=32, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),
        "qwen2_tied": lambda: Qwen2Config(**common, tie_word_embeddings=True),
    }[variant]()
    stats = ModelStats.from_hf_config(config.to_dict())
    assert stats.total_params == _hf_numel(config)
    if variant == "qwen3_moe_sparse_step_tied":
        assert stats.moe_layers == (False, True, False, False)  # every 2nd layer, layer 3 forced dense


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported by the planner; supported: qwen3_moe"):
        ModelStats.from_hf_config({"model_type": "gpt2"})
