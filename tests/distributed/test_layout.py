"""validate_layout: one test per bad layout, asserting the message says what to change."""

import pytest

from megarl.distributed import LayoutError, ModelShape, ParallelLayout, validate_layout

# Qwen3-30B-A3B-like shape: 48 layers, 32 heads / 4 KV heads, 128 experts
MOE = ModelShape(num_layers=48, num_attention_heads=32, num_kv_heads=4, num_experts=128, hidden_size=2048, vocab_size=151936)
DENSE = ModelShape(num_layers=28, num_attention_heads=16, num_kv_heads=8, hidden_size=1024, vocab_size=151936)


def _rejects(match, layout, world, shape=MOE, seq_length=None):
    with pytest.raises(LayoutError, match=match):
        validate_layout(layout, world, shape, seq_length)


def test_good_layouts_pass():
    validate_layout(ParallelLayout(tp=4, pp=4, ep=8, etp=1, cp=2), 64, MOE, seq_length=4096)
    validate_layout(ParallelLayout(tp=2, pp=4, vpp=3), 16, MOE, seq_length=4096)  # 48 = 4 x 3 x 4
    validate_layout(ParallelLayout(pp=5, num_layers_in_last_pipeline_stage=8), 5, MOE)  # 40 / 4 + 8
    assert ParallelLayout(tp=2, pp=2, cp=2).data_parallel_size(32) == 4
    assert ParallelLayout(tp=2, ep=4, etp=1, pp=2).expert_data_parallel_size(32) == 4


def test_etp_times_ep_must_divide_a_pipeline_stage():
    # megatron's expert grid is world = ETP x EP x EDP x PP
    _rejects(r"ETP x EP = 8 x 8 = 64 does not divide the 8 ranks of a pipeline stage.*world = ETP x EP x expert-DP x PP", ParallelLayout(tp=8, ep=8), 8)


def test_world_not_divisible_by_tp_pp_cp():
    _rejects(r"world size 12 is not divisible by TP x PP x CP = 2 x 2 x 2 = 8: use a world size that is a multiple of 8",
             ParallelLayout(tp=2, pp=2, cp=2), 12)


def test_experts_not_divisible_by_ep():
    _rejects(r"128 experts are not divisible by EP=3: use an ep that divides 128", ParallelLayout(ep=3), 3)


def test_ep_on_dense_model():
    _rejects(r"EP=2 needs a mixture-of-experts model.*set ep=1", ParallelLayout(ep=2), 2, DENSE)


def test_heads_not_divisible_by_tp():
    shape = ModelShape(num_layers=4, num_attention_heads=12, num_kv_heads=12, hidden_size=768, vocab_size=1000)
    _rejects(r"12 attention heads are not divisible by TP=8: use a tp that divides 12", ParallelLayout(tp=8), 8, shape)


def test_kv_groups_not_divisible_by_tp():
    _rejects(r"4 KV heads \(query groups\) are not divisible by TP=8.*use a tp that divides 4", ParallelLayout(tp=8), 8)


def test_layers_not_divisible_by_pp():
    _rejects(r"48 layers cannot be split evenly over PP=5: use a pp that divides 48, or set num_layers_in_last_pipeline_stage",
             ParallelLayout(pp=5), 5)


def test_layers_per_stage_not_divisible_by_vpp():
    _rejects(r"12 layers per pipeline rank cannot be split into VPP=5 chunks: num_layers must be divisible by pp x vpp = 20",
             ParallelLayout(pp=4, vpp=5), 4)


def test_vpp_needs_pp():
    _rejects(r"vpp=2 \(interleaved pipeline\) needs pp > 1", ParallelLayout(vpp=2), 1)


def test_uneven_last_stage_rest_not_divisible():
    _rejects(r"with num_layers_in_last_pipeline_stage=6, the remaining 42 layers cannot be split evenly over the other 4",
             ParallelLayout(pp=5, num_layers_in_last_pipeline_stage=6), 5)


def test_uneven_last_stage_with_vpp():
    _rejects(r"with VPP=2, every pipeline stage's layer count must be divisible by 2: last stage has 3",
             ParallelLayout(pp=4, vpp=2, num_layers_in_last_pipeline_stage=3), 4,
             ModelShape(num_layers=21, num_attention_heads=4, num_kv_heads=4, hidden_size=64, vocab_size=100))


def test_uneven_last_stage_takes_everything():
    _rejects(r"num_layers_in_last_pipeline_stage=48 leaves no layers", ParallelLayout(pp=2, num_layers_in_last_pipeline_stage=48), 2)


def test_last_stage_needs_pp():
    _rejects(r"num_layers_in_last_pipeline_stage needs pp > 1", ParallelLayout(num_layers_in_last_pipeline_stage=4), 1)


def test_sequence_not_divisible_by_two_cp():
    _rejects(r"sequence length 4098 is not divisible by 2 x CP = 8.*pad sequences to a multiple of 8",
             ParallelLayout(cp=4), 4, seq_length=4098)


def test_sequence_parallel_split_over_tp():
    _rejects(r"sequence parallelism splits each CP rank's 2049 tokens over TP=2: pad sequences to a multiple of 2",
             ParallelLayout(tp=2), 2, seq_length=2049)
    _rejects(r"sequence parallelism splits each CP rank's 1026 tokens over TP=4: pad sequences to a multiple of 8",
             ParallelLayout(tp=4, cp=2), 8, seq_length=2052)


def test_moe_with_tp_needs_sequence_parallel():
    _rejects(r"MoE with TP=2 requires sequence parallelism.*set sequence_parallel=True \(or leave it unset\)",
             ParallelLayout(tp=2, sequence_parallel=False), 2)
    validate_layout(ParallelLayout(tp=2, sequence_parallel=False), 2, DENSE)  # dense models may skip SP


def test_sequence_parallel_needs_tp():
    _rejects(r"sequence_parallel=True needs TP > 1", ParallelLayout(sequence_parallel=True), 1)


def test_etp_on_dense_model():
    _rejects(r"etp=1 only applies to mixture-of-experts models", ParallelLayout(tp=2, etp=1), 2, DENSE)


@pytest.mark.parametrize("field,value", [("tp", 0), ("pp", -1), ("cp", 1.5), ("ep", True), ("vpp", 0)])
def test_sizes_must_be_positive_integers(field, value):
    _rejects(rf"{field} must be", ParallelLayout(**{field: value}), 8)


def test_model_shape_from_hf_configs():
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    moe = ModelShape.from_hf_config(Qwen3MoeConfig(num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                                   num_experts=128, hidden_size=2048, vocab_size=151936))
    assert moe == MOE and moe.is_moe
    dense = ModelShape.from_hf_config(Qwen3Config(num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                                  hidden_size=1024, vocab_size=151936))
    assert dense == DENSE and not dense.is_moe
    qwen2 = ModelShape.from_hf_config(Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None,
                                                  hidden_size=64, vocab_size=512).to_dict())
    assert (qwen2.num_layers, qwen2.num_kv_heads, qwen2.num_experts) == (2, 4, 0)
    with pytest.raises(ValueError, match=r"lacks \['num_hidden_layers'"):
        ModelShape.from_hf_config({"model_type": "mystery", "num_attention_heads": 4, "hidden_size": 8, "vocab_size": 10})
