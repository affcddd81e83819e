"""parallel.recompute reaches the Megatron model (it used to be read by the dry-run planner only):
the actor's TransformerConfig carries it, the frozen reference does not, and a training step with
full recomputation gives the same loss and gradient norm as without."""

import pytest

from megarl.testing.distributed import run_on_ranks

pytestmark = [pytest.mark.distributed]


def _config(model_dir, recompute):
    from megarl.config import load_config

    return load_config(None, {
        "model.path": model_dir, "model.dtype": "fp32", "data.train_files": ["unused.parquet"],
        "optimizer.lr": 1e-2, "actor.ppo_mini_batch_size": 2, "actor.micro_batch_size": 2, "data.train_batch_size": 4,
        "rollout.n": 2, "rollout.max_new_tokens": 8, "trainer.gpus_per_node": 1,
        **{f"parallel.recompute.{k}": v for k, v in recompute.items()},
    }, check_paths=False)


def test_recompute_overrides_follow_the_config():
    from megarl.trainer.model_worker import model_config_overrides

    full = _config("/m", {"granularity": "full", "method": "block", "num_layers": 2})
    assert model_config_overrides(full) == {"moe_router_dtype": "fp32", "recompute_granularity": "full",
                                            "recompute_method": "block", "recompute_num_layers": 2}
    assert model_config_overrides(full, trainable=False) == {"moe_router_dtype": "fp32"}
    selective = _config("/m", {"granularity": "selective"})
    assert model_config_overrides(selective)["recompute_granularity"] == "selective"
    assert "recompute_granularity" not in model_config_overrides(_config("/m", {}))


def _step(model_dir):
    import torch

    from megarl.algorithms import compute_loss_normalisers, policy_loss_fn
    from megarl.models.batch import SequenceBatch
    from megarl.trainer.model_worker import build_engine, micro_batch_options
    from megarl.trainer.train_worker import policy_loss_options
    from megarl.distributed.init import init_distributed
    from megarl.trainer.model_worker import parallel_layout

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 400, (10 + i,), generator=g).tolist() for i in range(4)]
    masks = [[0.0] * 6 + [1.0] * (len(s) - 6) for s in seqs]
    batch = SequenceBatch.from_sequences(seqs, loss_mask=masks, advantages=[[0.5] * len(s) for s in seqs],
                                         rollout_logprobs=[[0.0] * len(s) for s in seqs])
    batch = batch.with_fields(old_logprobs=torch.zeros(batch.input_ids.shape))
    out = {}
    for name, recompute in (("none", {}), ("full", {"granularity": "full", "method": "uniform", "num_layers": 1})):
        cfg = _config(model_dir, recompute)
        init_distributed(parallel_layout(cfg), seed=cfg.trainer.seed)
        actor = build_engine(cfg, model_dir, micro_batches=micro_batch_options(cfg), total_optimizer_steps=2)
        ref = build_engine(cfg, model_dir, micro_batches=micro_batch_options(cfg))
        loss_fn = policy_loss_fn(policy_loss_options(cfg), compute_loss_normalisers(batch.fields["loss_mask"]))
        step = actor.train_step(batch, loss_fn)
        out[name] = (actor.config.recompute_granularity, ref.config.recompute_granularity, step.loss, step.grad_norm)
    return out


def test_full_recompute_is_applied_and_changes_no_number(tiny_moe_dir):
    (out,) = run_on_ranks(_step, 1, args=(tiny_moe_dir,), timeout=600)
    assert out["none"][:2] == (None, None)
    assert out["full"][:2] == ("full", None)  # the frozen reference has no backward to recompute for
    assert out["full"][2:] == pytest.approx(out["none"][2:], rel=1e-6, abs=1e-7)
