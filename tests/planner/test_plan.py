"""Dry-run plan: layout problems named with the field to change, per-GPU memory by hand formulas."""

import os

import pytest

from megarl.config import load_config
from megarl.planner import format_plan, plan_run
from tests.planner.hf_configs import QWEN3_235B_A22B

GIB = 1024**3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE_235B = os.path.join(ROOT, "configs", "qwen3_235b_a22b_grpo.yaml")


def _plan_235b(overrides=None, hf=QWEN3_235B_A22B):
    cfg = load_config(RECIPE_235B, {"model.path": "/unused", **(overrides or {})}, check_paths=False)
    return cfg, plan_run(cfg, hf_config=hf)


def test_235b_recipe_stage_memory_by_hand():
    cfg, plan = _plan_235b()
    assert plan.errors == []
    par, mem = plan.parallel, plan.memory
    assert (par.dp, par.expert_dp) == (4, 2)  # 128 / (TP4 x PP8), 128 / (EP8 x ETP1 x PP8)
    assert [s.layers for s in mem.stages] == [12] * 7 + [10]
    stage0, last = mem.stages[0], mem.stages[-1]
    # per layer: attention q/k/v/o split by TP 4; norms (2 x 4096 + q/k norms 2 x 128) and router replicated
    attn = 4096 * (64 * 128 + 2 * 4 * 128) + 64 * 128 * 4096
    dense_layer = attn // 4 + (2 * 4096 + 2 * 128) + 4096 * 128
    expert_layer = 128 // 8 * 3 * 4096 * 1536  # 16 experts per EP rank
    vocab_local = 152064 // 4  # 151936 padded to a multiple of 128 x TP
    assert stage0.dense_params == 12 * dense_layer + vocab_local * 4096
    assert stage0.expert_params == 12 * expert_layer
    assert last.dense_params == 10 * dense_layer + vocab_local * 4096 + 4096  # untied output layer + final norm
    assert stage0.param_bytes == 2 * stage0.params and stage0.grad_bytes == 4 * stage0.params
    # distributed optimizer: 12 B/param over DP (dense) / expert-DP (experts); half of it on the host
    full_opt = 12 * (stage0.dense_params / 4 + stage0.expert_params / 2)
    assert stage0.optimizer_gpu_bytes == int(0.5 * full_opt)
    assert stage0.optimizer_host_bytes == int(0.5 * full_opt * (1 + 4 / 12))  # + host fp32 grads
    # full uniform recompute of 1 layer, 8 micro-batches in flight on stage 0, SP over TP 4
    boundary = 4096 / 4 * 10240 * 2
    attn_act = 4096 / 4 + (64 * 128 + 2 * 4 * 128) / 4 + 64 * 128 / 4
    moe_act = 4096 / 4 + (2 * 128 + 2 * 8 * 4096 * 1 + 8 * 3 * 1536) / 4
    # kept: 12 layer inputs x 8 micro-batches; plus one layer's full activations while recomputing it
    assert stage0.activation_bytes == int(boundary * 12 * 8 + (attn_act + moe_act) * 10240 * 2)
    # rollout TP 16: weights split 16 ways; 4 KV heads -> one (replicated) per GPU
    r = mem.rollout
    assert r.weight_bytes_per_gpu == 235_093_634_560 * 2 // 16
    assert r.kv_bytes_per_token == 2 * 94 * 1 * 128 * 2
    assert r.kv_budget_bytes == int(0.85 * 80 * GIB - r.weight_bytes_per_gpu - 3 * GIB)
    assert r.resident_train_bytes == 0  # params, grads, optimizer all offloaded during rollout
    # a node holds 8 GPUs of one stage: host copies of params (2 B) + grads (4 B) + the whole optimizer state,
    # and the reference's weights (KL loss), offloaded with the actor's
    assert stage0.reference_bytes == stage0.param_bytes
    assert mem.host_bytes_per_node == 8 * (stage0.param_bytes + stage0.grad_bytes + stage0.optimizer_gpu_bytes
                                           + stage0.optimizer_host_bytes + stage0.reference_bytes)
    text = format_plan(plan, cfg)
    assert "parameters: 235.09B total, 22.19B active per token" in text
    assert "experts per EP rank: 16; attention heads per TP rank: 16; KV heads per TP rank: 1" in text
    assert text.endswith("plan: OK")


def test_dense_activations_without_recompute_by_hand():
    hf = {"model_type": "qwen3", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 1000,
          "tie_word_embeddings": True}
    cfg = load_config(None, {"model.path": "/m", "data.train_files": ["x"], "trainer.gpus_per_node": 1,
                             "actor.micro_batch_size": 2, "data.max_prompt_length": 100,
                             "rollout.max_new_tokens": 28, "data.train_batch_size": 64}, check_paths=False)
    plan = plan_run(cfg, hf_config=hf)
    (stage,) = plan.memory.stages
    tokens = 2 * 128
    per_token_layer = 256 + (256 + 2 * 128) + 256 + 256 + 3 * 512  # norm, qkv, attn out, norm, fc1 + act
    logits = tokens * 1024 * 4 * 2  # vocab padded to 1024, fp32, logits + grad
    assert stage.activation_bytes == 4 * per_token_layer * tokens * 2 + logits
    assert stage.dense_params == 1024 * 256 + 256 + 4 * (256 * (256 + 256) + 256 * 256 + 2 * 256 + 2 * 64
                                                         + 3 * 256 * 512)


FLAT_24_GPUS = {"parallel.tp": 1, "parallel.sequence_parallel": None, "parallel.pp": 1, "parallel.ep": 1, "parallel.num_layers_in_last_pipeline_stage": None,
                "trainer.nnodes": 3, "rollout.tensor_parallel_size": 8, "actor.ppo_mini_batch_size": 24,
                "data.train_batch_size": 48}


@pytest.mark.parametrize("overrides,expected", [
    ({**FLAT_24_GPUS, "parallel.tp": 3}, "parallel: 64 attention heads are not divisible by TP=3"),
    ({**FLAT_24_GPUS, "parallel.ep": 3}, "parallel: 128 experts are not divisible by EP=3"),
    ({"trainer.nnodes": 2}, "parallel: world size 16 is not divisible by TP x PP x CP = 4 x 8 x 1 = 32"),
    ({"parallel.num_layers_in_last_pipeline_stage": None}, "parallel: 94 layers cannot be split evenly over PP=8"),
    ({"parallel.num_layers_in_last_pipeline_stage": 11},
     "parallel: with num_layers_in_last_pipeline_stage=11, the remaining 83 layers cannot be split evenly"),
    ({"parallel.etp": 4}, "parallel: ETP x EP = 4 x 8 = 32 does not divide the 16 ranks of a pipeline stage"),
    ({"rollout.tensor_parallel_size": 128}, "rollout.tensor_parallel_size: 128 does not divide the model's 64"),
    ({"parallel.sequence_parallel": False}, "parallel: MoE with TP=4 requires sequence parallelism"),
])
def test_layout_problems_name_what_to_change(overrides, expected):
    cfg, plan = _plan_235b(overrides)
    assert any(e.startswith(expected) for e in plan.errors), plan.errors
    assert format_plan(plan, cfg).endswith("error(s)")


def test_batch_must_split_over_data_parallel_ranks():
    _, plan = _plan_235b({"actor.ppo_mini_batch_size": 1, "rollout.n": 2})
    assert plan.errors == ["actor.ppo_mini_batch_size: 1 prompts x rollout.n 2 = 2 sequences do not split "
                           "evenly over data-parallel size 4"]


def test_without_offload_training_fits_but_not_next_to_vllm():
    _, plan = _plan_235b({"optimizer.optimizer_cpu_offload": False, "optimizer.optimizer_offload_fraction": 0.0,
                          "optimizer.overlap_cpu_optimizer_d2h_h2d": False, "actor.param_offload": False,
                          "actor.grad_offload": False, "actor.optimizer_offload": False})
    assert plan.errors == []
    stage0 = plan.memory.stages[0]
    assert stage0.optimizer_gpu_bytes == int(12 * (stage0.dense_params / 4 + stage0.expert_params / 2))
    assert stage0.optimizer_host_bytes == 0 and plan.memory.host_bytes_per_node == 0
    assert stage0.train_peak_bytes < 80 * GIB  # ~46 GiB: training alone fits ...
    # the recipe's KL loss keeps the reference's weights resident too
    assert stage0.reference_bytes == stage0.param_bytes and stage0.critic_bytes == 0
    resident = stage0.param_bytes + stage0.grad_bytes + stage0.optimizer_gpu_bytes + stage0.other_models_bytes
    assert plan.memory.rollout.resident_train_bytes == resident  # ... but stays put while vLLM runs
    assert resident > 0.15 * 80 * GIB
    assert [w for w in plan.warnings if w.startswith("memory:")] == [
        f"memory: {resident / GIB:.1f} GiB of training state stays on each GPU during rollout but only 12.0 GiB is "
        "outside vLLM's share: enable actor.param_offload/grad_offload/optimizer_offload or lower "
        "rollout.gpu_memory_utilization"]


def test_ppo_counts_the_critic_beside_actor_and_reference():
    _, grpo = _plan_235b({})
    _, ppo = _plan_235b({"algorithm.name": "ppo", "algorithm.adv_estimator": "gae", "critic.optimizer.optimizer_cpu_offload": True,
                         "critic.optimizer.optimizer_offload_fraction": 0.5})
    for before, after in zip(grpo.memory.stages, ppo.memory.stages):
        critic = after.other_models_bytes - before.other_models_bytes
        # same architecture and offload fraction: the actor's state, less the output layer on the last stage
        assert critic <= before.actor_bytes and critic >= 0.99 * before.actor_bytes - (after.stage == 7) * 2**31
        assert after.train_peak_bytes == before.train_peak_bytes + critic


def test_disaggregated_placement_trains_on_the_rest():
    cfg, plan = _plan_235b({"rollout.placement": "disaggregated", "rollout.num_engines": 2, "trainer.nnodes": 20})
    assert plan.errors == []
    assert plan.parallel.train_gpus == 160 - 2 * 16 and plan.parallel.dp == 4
    assert plan.memory.rollout.resident_train_bytes == 0


def test_interleaved_pipeline_and_block_recompute_by_hand():
    """VPP: rank 0 keeps (pp-1)*2 + (vpp-1)*pp + 1 chunk-micro-batches; block recompute keeps inputs only
    for the first `num_layers` layers of the stage."""
    hf = {"model_type": "qwen3", "hidden_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256, "vocab_size": 512,
          "tie_word_embeddings": False}
    base = {"model.path": "/m", "data.train_files": ["x"], "trainer.gpus_per_node": 2, "parallel.pp": 2,
            "actor.micro_batch_size": 1, "data.max_prompt_length": 60, "rollout.max_new_tokens": 4,
            "rollout.n": 2, "actor.ppo_mini_batch_size": 2, "data.train_batch_size": 2}
    per_layer_full = (128 + (128 + 2 * 64) + 128 + 128 + 3 * 256) * 64 * 2  # 64 tokens, bf16
    boundary = 128 * 64 * 2

    cfg = load_config(None, {**base, "parallel.vpp": 2}, check_paths=False)
    stage0 = plan_run(cfg, hf_config=hf).memory.stages[0]
    chunk_microbatches = (2 - 1) * 2 + (2 - 1) * 2 + 1  # 5 chunks of 2 layers each
    assert stage0.activation_bytes == int(chunk_microbatches * 2 * per_layer_full)

    cfg = load_config(None, {**base, "parallel.recompute.granularity": "full", "parallel.recompute.method": "block",
                             "parallel.recompute.num_layers": 1}, check_paths=False)
    stage0 = plan_run(cfg, hf_config=hf).memory.stages[0]
    # 2 micro-batches in flight on stage 0: layer 0 keeps its input, layers 1-3 everything; + layer 0 recomputed
    assert stage0.activation_bytes == int(2 * (boundary + 3 * per_layer_full) + per_layer_full)


def test_sft_plan_has_no_rollout_and_counts_its_own_sequence_length():
    cfg, plan = _plan_235b({"trainer.type": "sft", "sft.max_length": 4096, "actor.use_dynamic_bsz": False,
                            "actor.micro_batch_size": 2, "actor.param_offload": False, "actor.grad_offload": False,
                            "actor.optimizer_offload": False, "algorithm.use_kl_loss": False})
    assert plan.errors == [] and plan.memory.tokens_per_microbatch == 2 * 4096
    assert plan.memory.stages[0].other_models_bytes == 0  # no reference, no critic
    text = format_plan(plan, cfg)
    assert "no rollout (sft): every GPU trains" in text and "KV budget" not in text
    assert not [w for w in plan.warnings if "rollout" in w]


def test_cpu_recipe_plans_the_cpu_kv_cache_not_a_gpu_share(tiny_moe_dir):
    """vLLM on CPU sizes its KV cache by VLLM_CPU_KVCACHE_SPACE (1 GiB), not gpu_memory_utilization:
    the tiny CPU recipe must not be told its "0.0 GiB" of weights leave no KV cache."""
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_moe_grpo_cpu.yaml"), {"model.path": tiny_moe_dir},
                      check_paths=False)
    plan = plan_run(cfg)
    r = plan.memory.rollout
    assert r.kv_budget_bytes == GIB
    assert r.kv_tokens == GIB // r.kv_bytes_per_token and r.kv_tokens > r.max_sequence_len
    assert not [w for w in plan.warnings if "KV" in w], plan.warnings
