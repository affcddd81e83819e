"""Run by test_policy_loss_demo.py in its own process: ONE trainer from the demo recipe (shrunk batch),
then `steps` steps with each policy loss in turn, switched between runs of `fit` (one start-up of
Megatron, vLLM and Ray for all of them), then ESTIMATOR_STEPS steps with each advantage estimator
(the driver's algorithm.adv_estimator, switched likewise). Writes {label: [per-step metrics]} as JSON.

    python tests/trainer/_policy_loss_sweep.py OUT.json RUN_DIR STEPS
"""

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

# label -> PolicyLossOptions overrides on top of the recipe's options
SWEEP = {
    "cispo": dict(policy_loss="cispo"),
    "sapo": dict(policy_loss="sapo"),
    "geo_mean": dict(policy_loss="geo_mean", loss_agg_mode="seq-mean-token-mean"),
    "clip_cov": dict(policy_loss="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=-5.0),
    "kl_cov": dict(policy_loss="kl_cov", kl_cov_ratio=0.05),
    "dppo_tv": dict(policy_loss="dppo_tv", clip_ratio_low=0.2, clip_ratio_high=0.2),
    "dppo_kl": dict(policy_loss="dppo_kl", clip_ratio_low=0.05, clip_ratio_high=0.05),
    "reinforce": dict(policy_loss="reinforce"),
    "dro": dict(policy_loss="dro"),
    "bypass_ppo_clip": dict(policy_loss="bypass_mode"),
    "bypass_reinforce": dict(policy_loss="bypass_mode", bypass_loss_type="reinforce"),
    "token_sum_k3_plus": dict(policy_loss="ppo", loss_agg_mode="token-sum", kl_loss_type="k3+"),
}

ESTIMATORS = ["remax", "opo", "gpg", "grpo_passk", "optimal_token_baseline", "tir_optimal_token_baseline"]
ESTIMATOR_STEPS = 3


def main(out_path: str, run_dir: str, steps: int) -> None:
    import dataclasses

    from launch.demo import CONFIG, prepare
    from megarl.config import load_config
    from megarl.trainer.rl_trainer import RLTrainer
    from megarl.trainer.train_worker import policy_loss_options

    model_dir, train, val = prepare(run_dir, 0.02)
    cfg = load_config(CONFIG, {
        "model.path": model_dir, "data.train_files": [train], "data.val_files": [], "trainer.output_dir": run_dir,
        "trainer.total_steps": steps * len(SWEEP) + ESTIMATOR_STEPS * len(ESTIMATORS), "trainer.save_freq": 0, "trainer.test_freq": -1,
        "trainer.logger": ["console"], "data.train_batch_size": 4, "rollout.n": 4, "actor.ppo_mini_batch_size": 2,
        "actor.micro_batch_size": 4,
    })
    started = time.perf_counter()
    trainer = RLTrainer(cfg)
    results = {"startup_s": time.perf_counter() - started}
    base = policy_loss_options(cfg)
    try:
        for label, overrides in SWEEP.items():
            trainer.workers.all.set_policy_loss(dataclasses.replace(base, **overrides))
            trainer.total_steps = trainer.step + steps
            started = time.perf_counter()
            results[label] = trainer.fit()
            results[f"{label}_s"] = time.perf_counter() - started
        trainer.workers.all.set_policy_loss(base)
        for name in ESTIMATORS:
            trainer.cfg.algorithm.adv_estimator = name
            trainer.total_steps = trainer.step + ESTIMATOR_STEPS
            started = time.perf_counter()
            results[name] = trainer.fit()
            results[f"{name}_s"] = time.perf_counter() - started
    finally:
        trainer.close()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
