"""PPO with a Megatron critic end to end on the real stack (Megatron ranks as Ray actors, a vLLM
CPU engine, Ray): the PPO demo recipe, shortened, learns, and its critic learns the returns' level."""

import json
import os
import subprocess
import sys

import pytest

from megarl.trainer.metrics import read_tensorboard_scalars

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRITIC_SCALARS = ["critic/vf_loss", "critic/vf_clipfrac", "critic/vf_explained_var", "critic/values/mean",
                  "critic/returns/mean", "critic/grad_norm", "critic/lr", "timing_s/values", "timing_s/update_critic"]


def pooled_explained_variance(rows, first_step: int, last_step: int) -> float:
    """The critic's explained variance over steps first_step..last_step taken together:
    1 - sum Var(returns - values) / sum Var(returns), from each step's explained variance weighted
    by its returns' variance. A step where nearly every sample scored the same says little about
    the critic and weighs little; in a plain mean of per-step values such steps dominate the noise."""
    steps = [r for r in rows if first_step <= r["step"] <= last_step and "critic/vf_explained_var" in r]
    weights = [r["critic/returns/std"] ** 2 for r in steps]
    return sum(r["critic/vf_explained_var"] * w for r, w in zip(steps, weights)) / sum(weights)


def test_shortened_ppo_demo_learns_and_its_critic_trains(tmp_path):
    """The PPO recipe cut to 80 steps: the reward rises, and the critic, from an untrained value
    head that predicts worse than the returns' mean, comes to predict them no worse than that.

    Measured (2 shared cores, load average 6-60; trainer/data seeds default 1234/1, 1/1, 2/2):
    reward gain (mean of the last 16 steps minus the first 16) +0.140, +0.245, +0.212; explained
    variance at step 1 -1.32, -2.42, -9.57; pooled over steps 41-80 +0.023, +0.143, +0.487 (min
    +0.023, max +0.487). Seeds 1 and 2 ran side by side at load 40-60 (cut at step 53 / 52 by the
    25-min timeout) and again at load 6-35: metric for metric the same over those steps. Bounds:
    gain >= 0.07 (half the minimum), step 1 < -0.5, pooled > -0.05.
    Breaks checked by hand: critic lr 1e-12 (30 steps): pooled explained variance over steps 16-30
    -1.31 and gain -0.014; the advantage's sign flipped (on GRPO, the same code path): gain -0.015.
    The default-seed run is metric for metric the same (13 steps compared) at commit 64d2630,
    where the recipe was tuned, and the fresh machine of issue 12 printed its very numbers (gain
    0.139, last-quarter mean explained variance 0.03): the figures this test first asserted (gain
    >= 0.15, explained variance > 0.1) were measured elsewhere and do not come back."""
    out = str(tmp_path / "ppo")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "demo.py"),
                           "--config", os.path.join(REPO, "configs", "tiny_moe_ppo_cpu.yaml"), "--steps", "80",
                           "--output", out, "--trainer.test_freq=-1", "--trainer.save_freq=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from launch.demo import reward_summary

    first, last = reward_summary(os.path.join(out, "metrics.jsonl"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: r["step"])
    # (a step whose returns are all equal has no explained variance; it is not logged)
    untrained = rows[0].get("critic/vf_explained_var")  # None if every step-1 sample scored the same
    tail = pooled_explained_variance(rows, 41, 80)
    print(f"mean reward first 20% {first:.3f}, last 20% {last:.3f}, gain {last - first:+.3f}; explained "
          f"variance at step 1 {untrained}, pooled over steps 41-80 {tail:.3f}")
    assert last - first >= 0.07
    # the actor stands still during the critic warmup, then moves
    warmup = 2
    assert all("actor/pg_loss" not in r for r in rows[:warmup]) and all("actor/pg_loss" in r for r in rows[warmup:])
    # an untrained value head predicts worse than the returns' mean; the trained critic does not
    assert (untrained is None or untrained < -0.5) and tail > -0.05
    scalars = read_tensorboard_scalars(os.path.join(out, "tensorboard"))
    missing = [name for name in CRITIC_SCALARS if name not in scalars]
    assert not missing, missing
