"""The demo recipe (real Megatron ranks as Ray actors, a vLLM CPU engine) runs 10 steps with each
policy loss added for verl 0.9.1 users, without error: finite losses and gradients at every step;
then a few steps with each new outcome estimator, ReMax with its greedy baseline generated in the loop.
One trainer start-up serves all of them (the loss is switched between runs of `fit`); the batch is
shrunk to 4 prompts x 4 samples to keep the sweep short."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.trainer._policy_loss_sweep import ESTIMATOR_STEPS, ESTIMATORS, SWEEP

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 10


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_loss_demo")
    out = str(root / "sweep.json")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "trainer", "_policy_loss_sweep.py"), out,
                           str(root / "run"), str(STEPS)], cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        results = json.load(f)
    print({k: round(v, 1) for k, v in results.items() if k.endswith("_s")})
    return results


@pytest.mark.parametrize("label", list(SWEEP))
def test_demo_runs_ten_steps_with_the_policy_loss(sweep, label):
    history = sweep[label]
    assert len(history) == STEPS
    for metrics in history:
        for key in ("actor/pg_loss", "actor/loss", "actor/grad_norm", "actor/ppo_kl"):
            assert math.isfinite(metrics[key]), (label, key, metrics[key])
    assert any(m["actor/grad_norm"] > 0 for m in history), label


@pytest.mark.parametrize("name", ESTIMATORS)
def test_demo_runs_with_the_advantage_estimator(sweep, name):
    history = sweep[name]
    assert len(history) == ESTIMATOR_STEPS
    for metrics in history:
        assert math.isfinite(metrics["critic/advantages/mean"]) and math.isfinite(metrics["actor/grad_norm"])
        # ReMax generates its greedy baseline in the loop, the optimal token baselines run a sum-pi^2
        # forward; the others do nothing extra
        assert ("timing_s/generate_baseline" in metrics) == (name == "remax"), name
        assert ("timing_s/sum_pi_squared" in metrics) == name.endswith("optimal_token_baseline"), name
        if name == "remax":
            assert math.isfinite(metrics["critic/reward_baselines/mean"])
