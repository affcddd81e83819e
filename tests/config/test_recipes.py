"""Every recipe in configs/ loads and validates; the big ones also plan on their cluster size."""

import glob
import json
import os

import pytest

from megarl.config import load_config
from megarl.planner import plan_run
from tests.planner.hf_configs import QWEN3_30B_A3B, QWEN3_235B_A22B

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_recipes_exist():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"tiny_moe_grpo_cpu.yaml", "qwen3_235b_a22b_grpo.yaml", "qwen3_30b_a3b_grpo.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_validates(path):
    load_config(path, check_paths=False)


def test_235b_recipe_carries_the_verl_megatron_knobs():
    cfg = load_config(os.path.join(ROOT, "configs", "qwen3_235b_a22b_grpo.yaml"), check_paths=False)
    p, o, a, ac = cfg.parallel, cfg.optimizer, cfg.algorithm, cfg.actor
    assert (p.tp, p.pp, p.ep, p.etp, p.cp, cfg.rollout.tensor_parallel_size) == (4, 8, 8, 1, 1, 16)
    assert p.num_layers_in_last_pipeline_stage == 10 and p.sequence_parallel
    assert (p.recompute.granularity, p.recompute.method, p.recompute.num_layers) == ("full", "uniform", 1)
    assert ac.param_offload and ac.grad_offload and ac.use_dynamic_bsz and ac.router_dtype == "fp32"
    assert o.optimizer_cpu_offload and o.optimizer_offload_fraction == 0.5
    assert o.overlap_cpu_optimizer_d2h_h2d and o.use_precision_aware_optimizer
    assert (o.lr, o.lr_warmup_steps, o.weight_decay, o.clip_grad) == (1e-6, 10, 0.1, 1.0)
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (a.use_kl_loss, a.kl_loss_type, a.kl_loss_coef, a.loss_agg_mode) == (True, "low_var_kl", 0.001, "token-mean")
    assert cfg.rollout.n == 16 and (cfg.trainer.nnodes, cfg.trainer.gpus_per_node) == (16, 8)


@pytest.mark.parametrize("recipe,hf", [("qwen3_235b_a22b_grpo.yaml", QWEN3_235B_A22B),
                                       ("qwen3_30b_a3b_grpo.yaml", QWEN3_30B_A3B)])
def test_big_recipes_plan_cleanly_on_their_cluster(recipe, hf, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(os.path.join(ROOT, "configs", recipe), {"model.path": str(tmp_path)}, check_paths=False)
    plan = plan_run(cfg)
    assert plan.errors == []
    assert plan.memory.worst_stage.train_peak_bytes < cfg.trainer.gpu_memory_gib * 1024**3
    assert plan.memory.rollout.kv_tokens > plan.memory.rollout.max_sequence_len


@pytest.mark.parametrize("recipe,kind", [("tiny_moe_sft_cpu.yaml", "sft"), ("tiny_moe_dpo_cpu.yaml", "dpo")])
def test_supervised_cpu_recipes(recipe, kind):
    """The SFT / DPO demos: their trainer type, the EP2 demo layout on 2 processes, packed micro-batches
    whose token budget holds the longest sequence, and data made by tools/prepare_data.py."""
    cfg = load_config(os.path.join(ROOT, "configs", recipe), check_paths=False)
    assert cfg.trainer.type == kind and cfg.model.dtype == "fp32"
    assert (cfg.parallel.ep, cfg.trainer.nnodes, cfg.trainer.gpus_per_node) == (2, 1, 2)
    longest = cfg.sft.max_length if kind == "sft" else cfg.dpo.max_length
    assert cfg.actor.use_dynamic_bsz and cfg.actor.max_token_len_per_gpu >= longest
    assert cfg.model.ref_path == cfg.model.path  # DPO's frozen reference: the initial policy
    with open(os.path.join(ROOT, "configs", recipe)) as f:
        assert f"--synthetic-{kind}" in f.read()


def test_supervised_config_checks():
    """SFT / DPO relations checked at load time, each naming the field to change."""
    from megarl.config import ConfigError

    dpo = os.path.join(ROOT, "configs", "tiny_moe_dpo_cpu.yaml")
    with pytest.raises(ConfigError, match=r"actor.max_token_len_per_gpu: 100 tokens cannot hold one preference pair "
                                          r"of up to 128 tokens"):
        load_config(dpo, {"actor.max_token_len_per_gpu": 100}, check_paths=False)
    with pytest.raises(ConfigError, match=r"data.train_batch_size: 1 pairs cannot feed 2 data-parallel ranks"):
        load_config(dpo, {"data.train_batch_size": 1}, check_paths=False)
    from megarl.config.cli import build_config

    sft = os.path.join(ROOT, "configs", "tiny_moe_sft_cpu.yaml")
    _, warnings = build_config(sft, [("sft.max_trained_count", "2"), ("trainer.total_steps", "null")],
                               check_paths=False)
    assert any(w.startswith("sft.max_trained_count: 2 is never reached") for w in warnings)
