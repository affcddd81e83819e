"""The CPU demo (`make demo`): GRPO on a tiny random Qwen3-MoE with real Megatron (2 ranks, EP2),
a vLLM CPU engine in a Ray actor and Ray, on a synthetic arithmetic task made here.

    python launch/demo.py [--steps N] [--output runs/tiny_moe_grpo_cpu] [any launch/train.py override]
    python launch/demo.py --config configs/tiny_moe_ppo_cpu.yaml     # the same task with PPO + a critic
    python launch/demo.py --config configs/tiny_moe_sft_cpu.yaml     # SFT on synthetic conversations
    python launch/demo.py --config configs/tiny_moe_dpo_cpu.yaml     # DPO on synthetic preference pairs

Writes the model and data under the run folder (once), trains, and prints the mean reward of the
first and last 20% of steps. TensorBoard: `tensorboard --logdir runs/tiny_moe_grpo_cpu/tensorboard`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG = os.path.join(REPO, "configs", "tiny_moe_grpo_cpu.yaml")


def _records(kind: str, num: int, seed: int, split: str) -> list[dict]:
    """Synthetic rows for a trainer type: RL prompts, SFT conversations or DPO pairs (same questions)."""
    from megarl.data.synthetic import arith_records, preference_arith_records, sft_arith_records

    # Sums of two operands 0..4: 25 facts, learnable by a 2-layer, hidden-64 model in a few minutes.
    task = dict(ops=("+",), max_operand=4)
    if kind == "sft":
        return sft_arith_records(num, seed=seed, **task)
    if kind == "dpo":
        return preference_arith_records(num, seed=seed, **task)
    return arith_records(num, seed=seed, split=split, **task)


def prepare(run_dir: str, init_std: float, kind: str = "rl") -> tuple[str, str, str]:
    """Tiny model and synthetic data for a trainer type under run_dir (kept between runs)."""
    from megarl.data.records import write_records
    from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model

    model_dir = os.path.join(run_dir, "models", "qwen3_moe")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        write_tiny_model(model_dir, TinyModelSpec(arch="qwen3_moe", init_std=init_std))
    train = os.path.join(run_dir, "data", "train.parquet")
    val = os.path.join(run_dir, "data", "val.parquet")
    if not os.path.exists(train):
        write_records(_records(kind, 2000, 0, "train"), train)
        write_records(_records(kind, 64, 1, "test"), val)
    return model_dir, train, val


def reward_summary(metrics_path: str, fraction: float = 0.2) -> tuple[float, float]:
    """Mean reward over the first and the last `fraction` of the logged steps."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    rewards = [r["reward/score/mean"] for r in sorted(rows, key=lambda r: r["step"])]
    k = max(1, round(len(rewards) * fraction))
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def summary(kind: str, metrics_path: str) -> str:
    """One line on what the run learned: reward (RL), validation loss (SFT), validation reward
    accuracy and loss (DPO)."""
    if kind == "rl":
        first, last = reward_summary(metrics_path)
        return f"mean reward first 20% of steps {first:.3f}, last 20% {last:.3f}, gain {last - first:+.3f}"
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    val = [r for r in sorted(rows, key=lambda r: r["step"]) if "val/loss" in r]
    if not val:
        return "no validation steps logged"
    line = f"validation loss {val[0]['val/loss']:.4f} (step {val[0]['step']}) -> {val[-1]['val/loss']:.4f} (step {val[-1]['step']})"
    if kind == "dpo":
        line += f", reward accuracy {val[0]['val/rewards/accuracies']:.3f} -> {val[-1]['val/rewards/accuracies']:.3f}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, help="an RL recipe for the tiny MoE (GRPO by default)")
    parser.add_argument("--output", default=None, help="run folder; default runs/<recipe name>")
    parser.add_argument("--steps", type=int, default=None, help="override trainer.total_steps")
    parser.add_argument("--init-std", type=float, default=0.02,
                        help="std of the random initial weights (a smooth start the policy can learn from)")
    args, overrides = parser.parse_known_args(argv)
    name = os.path.splitext(os.path.basename(args.config))[0]
    run_dir = os.path.abspath(args.output or os.path.join(REPO, "runs", name))
    from megarl.config.loader import read_yaml

    kind = (read_yaml(args.config).get("trainer") or {}).get("type", "rl")
    model_dir, train, val = prepare(run_dir, args.init_std, kind)
    from launch.train import main as train_main

    train_args = [
        "--config", args.config, f"--model.path={model_dir}", f"--data.train_files=[{train}]", f"--data.val_files=[{val}]",
        f"--trainer.output_dir={run_dir}", *([f"--trainer.total_steps={args.steps}"] if args.steps else []), *overrides,
    ]
    status = train_main(train_args)
    if status == 0:
        print(f"demo: {summary(kind, os.path.join(run_dir, 'metrics.jsonl'))}")
    return status


if __name__ == "__main__":
    sys.exit(main())
