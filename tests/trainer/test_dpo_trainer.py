"""DPO end to end on the real stack (Megatron ranks as Ray actors over gloo, the tiny Qwen3-MoE):
with policy == reference the first loss is exactly the closed form (log 2 for sigmoid, (1/(2 beta))^2
for IPO), and on a style preference the reward accuracy rises above 0.9, at world 2 with EP2."""

import math
import os

import pytest

from megarl.data.records import write_records
from megarl.data.synthetic import preference_arith_records
from megarl.trainer.metrics import read_tensorboard_scalars

pytestmark = pytest.mark.usefixtures("ray_session")

BETA = 0.1


def _run(model_dir, out_dir, train, val, **overrides):
    from megarl.config import load_config
    from megarl.trainer.dpo_trainer import DPOTrainer

    cfg = load_config(None, {
        "trainer.type": "dpo", "model.path": model_dir, "model.dtype": "fp32", "data.train_files": [train],
        "data.val_files": [val], "data.train_batch_size": 16, "dpo.beta": BETA, "dpo.max_length": 64,
        "actor.use_dynamic_bsz": True, "actor.max_token_len_per_gpu": 256, "optimizer.lr": 3e-3,
        "optimizer.weight_decay": 0.0, "trainer.output_dir": out_dir, "trainer.logger": ["tensorboard"],
        "trainer.device": "cpu", "trainer.resume": "disable", "trainer.save_freq": 0, **overrides,
    }, check_paths=False)
    trainer = DPOTrainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Chosen "<answer>N</answer>", rejected the bare "N": a style preference."""
    root = tmp_path_factory.mktemp("dpo_pairs")
    train, val = str(root / "train.jsonl"), str(root / "val.jsonl")
    write_records(preference_arith_records(128, seed=0, rejected="plain"), train)
    write_records(preference_arith_records(32, seed=1, rejected="plain"), val)
    return train, val


@pytest.mark.slow  # two 2-rank runs: ~30 s alone, ~90 s on busy cores
def test_dpo_sigmoid_starts_at_log2_learns_the_preference_and_resumes_at_ep2(tmp_path, tiny_moe_dir, pairs):
    out = str(tmp_path / "run")
    ep2 = {"trainer.total_steps": 8, "trainer.test_freq": 4, "trainer.save_freq": 4, "trainer.gpus_per_node": 2,
           "parallel.ep": 2}
    history = _run(tiny_moe_dir, out, *pairs, **ep2)
    first = history[0]
    print(f"step-1 loss {first['train/loss']!r} (log 2 = {math.log(2)!r}); accuracies "
          f"{[round(h['train/rewards/accuracies'], 3) for h in history]}; val accuracies "
          f"{[h['val/rewards/accuracies'] for h in history if 'val/rewards/accuracies' in h]}")
    # policy == reference and the same micro-batch plan: every pair's margin is exactly 0
    assert abs(first["train/loss"] - math.log(2)) < 1e-7
    assert first["train/rewards/margins"] == 0.0 and first["train/rewards/chosen"] == 0.0
    assert first["train/rewards/accuracies"] == 0.0  # ties are not counted as ranked right
    assert first["train/micro_batches"] >= 1 and first["train/pairs"] == 16
    # Measured (trainer.seed = data.seed = 1, 2, 3; load average 50-61 on 2 cores): train reward
    # accuracy 1.0 from step 2 on, validation accuracy 1.0 at steps 4 and 8, validation loss at
    # step 8 0.0015, 0.0017, 0.0017 (max 0.0017, 1/200 of the bound). No sampling: a seed repeats
    # exactly on one machine. The untrained policy (= reference) has accuracy 0 and loss log 2.
    assert min(h["train/rewards/accuracies"] for h in history[-3:]) > 0.9
    assert history[-1]["val/rewards/accuracies"] > 0.9
    assert history[-1]["val/loss"] < 0.5 * math.log(2)
    scalars = read_tensorboard_scalars(os.path.join(out, "tensorboard"))
    for key in ("train/loss", "train/dpo_loss", "train/rewards/accuracies", "train/rewards/margins",
                "train/rewards/chosen", "train/rewards/rejected", "train/grad_norm", "train/lr", "val/loss"):
        assert key in scalars, key

    # a second run resumed from the step-4 checkpoint repeats steps 5-8 exactly (reference unchanged)
    step4 = os.path.join(out, "checkpoints", "step_00000004")
    resumed = _run(tiny_moe_dir, str(tmp_path / "resumed"), *pairs, **ep2, **{"trainer.resume": step4})
    assert len(resumed) == 4
    for step, (a, b) in enumerate(zip(history[4:], resumed), start=5):
        print(f"step {step}: loss straight {a['train/loss']:.10f} resumed {b['train/loss']:.10f}")
        for key in ("train/loss", "train/grad_norm", "train/rewards/margins"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (step, key)


def test_dpo_ipo_starts_at_its_closed_form(tmp_path, tiny_moe_dir, pairs):
    history = _run(tiny_moe_dir, str(tmp_path / "run"), *pairs, **{
        "trainer.total_steps": 1, "dpo.loss_type": "ipo", "trainer.gpus_per_node": 1,
        "actor.use_dynamic_bsz": False, "actor.micro_batch_size": 3})
    print(f"ipo step-1 loss {history[0]['train/loss']!r}, (1/(2 beta))^2 = {(1 / (2 * BETA)) ** 2!r}")
    assert history[0]["train/loss"] == pytest.approx((1 / (2 * BETA)) ** 2, rel=1e-7)
    assert history[0]["train/micro_batches"] == 6  # 16 pairs in micro-batches of 3 pairs
