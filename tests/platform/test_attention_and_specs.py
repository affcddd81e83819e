"""TorchCoreAttention equals megatron's local DotProductAttention; packed THD equals per-sequence
attention; the CPU layer spec keeps megatron's local-spec parameter names. One world-1 process."""

from __future__ import annotations

import pytest

from megarl.testing.distributed import run_on_ranks


def _attention_world():
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed
    from megarl.platform.attention import TorchCoreAttention, cp_local_positions, packed_local_layout
    from tests.distributed import tiny_gpt

    layout = ParallelLayout()
    init_distributed(layout)
    config = tiny_gpt.tiny_config(layout)  # 4 heads, 2 query groups (GQA), head_dim 32
    results = {}

    ours = TorchCoreAttention(config, 1, AttnMaskType.causal, "self")
    megatron = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 3, 4, 32, generator=g)  # [s, b, heads, d]
    k, v = torch.randn(12, 3, 2, 32, generator=g), torch.randn(12, 3, 2, 32, generator=g)
    results["causal"] = (ours(q, k, v, None) - megatron(q, k, v, None)).abs().max().item()

    # megatron mask convention: True = masked out; here causal + the last 4 keys of batch row 1
    mask = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1).expand(3, 1, 12, 12).clone()
    mask[1, :, :, 8:] = True
    results["user_mask"] = (ours(q, k, v, mask) - megatron(q, k, v, mask)).abs().max().item()

    # packed: three sequences in one THD row == each sequence on its own
    lengths = [5, 9, 6]
    cu = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
    qt, kt, vt = torch.randn(20, 4, 32, generator=g), torch.randn(20, 2, 32, generator=g), torch.randn(20, 2, 32, generator=g)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    packed = ours(qt, kt, vt, None, packed_seq_params=params)  # [t, heads * d]
    separate = torch.cat([
        megatron(qt[a:b, None], kt[a:b, None], vt[a:b, None], None)[:, 0]
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
    ])
    results["packed"] = (packed - separate).abs().max().item()
    results["packed_shape"] = tuple(packed.shape)
    results["unpacked_differs"] = (ours(qt[:, None], kt[:, None], vt[:, None], None)[:, 0] - separate).abs().max().item()

    results["cp_positions"] = [cp_local_positions(8, 2, r).tolist() for r in range(2)]
    seq_ids, pos = packed_local_layout(torch.tensor([0, 4, 12]), 2, 1)
    results["packed_layout"] = (seq_ids.tolist(), pos.tolist())
    del lengths
    return results


def _spec_world():
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed
    from megarl.platform.attention import TorchCoreAttention
    from megarl.platform.layer_specs import gpt_decoder_block_spec, uses_transformer_engine
    from tests.distributed import tiny_gpt

    layout = ParallelLayout()
    init_distributed(layout)  # no-op when _attention_world already did it
    config = tiny_gpt.tiny_config(layout)

    def build(spec):
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=64,
                        position_embedding_type="rope")

    ours = build(gpt_decoder_block_spec(config))
    megatron_local = build(get_gpt_decoder_block_spec(config, use_transformer_engine=False))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
    layer = ours.decoder.layers[0]
    return {
        "te": uses_transformer_engine(),
        "same_names": shapes(ours) == shapes(megatron_local),
        "n_params": len(shapes(ours)),
        "core_attention": type(layer.self_attention.core_attention) is TorchCoreAttention,
        "norm_types": {type(layer.input_layernorm).__name__, type(layer.self_attention.q_layernorm).__name__},
        "norm_tagged": all(hasattr(p, "sequence_parallel") for p in layer.input_layernorm.parameters()),
        "megatron_spec_untouched": type(megatron_local.decoder.layers[0].self_attention.core_attention).__name__,
        "dtype": layer.input_layernorm.weight.dtype == torch.float32,
    }


def _world():
    return {"attention": _attention_world(), "spec": _spec_world()}


@pytest.fixture(scope="module")
def world1():
    return run_on_ranks(_world, world_size=1, timeout=400)[0]


@pytest.fixture(scope="module")
def attention_results(world1):
    return world1["attention"]


@pytest.mark.timeout(450)
def test_matches_megatron_dot_product_attention(attention_results):
    assert attention_results["causal"] < 1e-6
    assert attention_results["user_mask"] < 1e-6


@pytest.mark.timeout(450)
def test_packed_thd_is_block_diagonal(attention_results):
    assert attention_results["packed_shape"] == (20, 128)
    assert attention_results["packed"] < 1e-6
    assert attention_results["unpacked_differs"] > 1e-2  # the boundaries matter


@pytest.mark.timeout(450)
def test_context_parallel_positions(attention_results):
    # 8 tokens, CP2: 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert attention_results["cp_positions"] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    # packed sequences of padded lengths 4 and 8 at CP2, rank 1: chunk 1, 2 of each sequence
    assert attention_results["packed_layout"] == ([0, 0, 1, 1, 1, 1], [1, 2, 2, 3, 4, 5])


@pytest.mark.timeout(450)
def test_cpu_spec_keeps_megatron_local_names(world1):
    result = world1["spec"]
    assert result["te"] is False
    assert result["same_names"] and result["n_params"] > 10
    assert result["core_attention"]
    assert result["norm_types"] == {"RMSNorm"}
    assert result["norm_tagged"] and result["dtype"]
    assert result["megatron_spec_untouched"] == "DotProductAttention"  # we deep-copy, never mutate megatron's spec


def test_transformer_config_overrides_on_cpu():
    from megarl.distributed import ParallelLayout
    from megarl.platform import transformer_config_overrides

    cpu = transformer_config_overrides(ParallelLayout(tp=2, pp=2, vpp=2, ep=2, etp=1, cp=2), is_moe=True)
    assert cpu["use_cpu_initialization"] is True
    assert cpu["moe_grouped_gemm"] is False and cpu["moe_permute_fusion"] is False
    assert cpu["gradient_accumulation_fusion"] is False and cpu["bias_dropout_fusion"] is False
    assert (cpu["batch_p2p_comm"], cpu["overlap_p2p_comm"]) == (False, True)  # VPP over gloo
    assert cpu["sequence_parallel"] is True
    assert (cpu["tensor_model_parallel_size"], cpu["pipeline_model_parallel_size"], cpu["virtual_pipeline_model_parallel_size"],
            cpu["expert_model_parallel_size"], cpu["expert_tensor_parallel_size"], cpu["context_parallel_size"]) == (2, 2, 2, 2, 1, 2)
    plain = transformer_config_overrides(ParallelLayout(pp=2))
    assert "batch_p2p_comm" not in plain and plain["sequence_parallel"] is False
    # MoE with TP>1 always gets sequence parallelism; a dense model keeps what the layout says
    assert transformer_config_overrides(ParallelLayout(tp=2, sequence_parallel=False), is_moe=True)["sequence_parallel"] is True
    assert transformer_config_overrides(ParallelLayout(tp=2, sequence_parallel=False))["sequence_parallel"] is False


def test_device_detection_without_megatron():
    import subprocess
    import sys

    code = (
        "import sys, megarl.platform as p; "
        "assert 'megatron' not in sys.modules; "
        "print(p.accelerator_available(), p.collective_backend(), p.current_device())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "gloo", "cpu"]
