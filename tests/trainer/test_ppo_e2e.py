"""PPO with a Megatron critic end to end on the real stack (Megatron ranks as Ray actors, a vLLM
CPU engine, Ray): the PPO demo recipe, shortened, learns, and its critic comes to explain part of
the returns' variance."""

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


def test_shortened_ppo_demo_learns_and_its_critic_explains_returns(tmp_path):
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
    explained = [r["critic/vf_explained_var"] for r in rows if "critic/vf_explained_var" in r]
    tail = explained[-len(explained) // 4:]
    print(f"mean reward first 20% {first:.3f}, last 20% {last:.3f}; explained variance first 5 "
          f"{[round(x, 3) for x in explained[:5]]}, mean of the last quarter {sum(tail) / len(tail):.3f}")
    assert last - first >= 0.15  # measured 0.22 here; the full 120-step recipe gains 0.27
    # the actor stands still during the critic warmup, then moves
    warmup = 2
    assert all("actor/pg_loss" not in r for r in rows[:warmup]) and all("actor/pg_loss" in r for r in rows[warmup:])
    # from ~0 while the policy is near uniform to clearly positive once its answers depend on the prompt
    assert max(explained[:10]) < 0.05 and sum(tail) / len(tail) > 0.1
    scalars = read_tensorboard_scalars(os.path.join(out, "tensorboard"))
    missing = [name for name in CRITIC_SCALARS if name not in scalars]
    assert not missing, missing
