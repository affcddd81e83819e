"""megarl training entry point.

    python launch/train.py --config configs/qwen3_30b_a3b_grpo.yaml --tp 4 --ep 8 --rollout.n=16
    python launch/train.py --config configs/qwen3_235b_a22b_grpo.yaml --nnodes 16 --dry-run

Parses the recipe and overrides, validates everything, prints the resolved config (YAML), checks the
parallel layout against the model's config.json, and then either prints the parallel/memory plan and
exits (--dry-run) or hands the config to the trainer. A bad config or layout exits with status 2
before any process group, Ray cluster or model exists.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megarl.config import ConfigError, build_config, parse_cli, to_yaml  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_cli(argv)
        # A dry run plans from the model's config.json; the data need not be visible from here.
        cfg, warnings = build_config(args.config_path, args.overrides, check_data_paths=not args.dry_run)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("# resolved config" + (f" ({args.config_path})" if args.config_path else ""))
    print(to_yaml(cfg), end="")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)

    from megarl.planner import format_plan, plan_run

    try:
        plan = plan_run(cfg)
    except ValueError as exc:  # a model type the planner does not know, a malformed config.json
        if args.dry_run:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"warning: layout not checked before start: {exc}", file=sys.stderr)
        plan = None
    if args.dry_run:
        print("# dry-run plan")
        print(format_plan(plan, cfg))
        return 2 if plan.errors else 0
    if plan is not None:
        # The layout is checked here too, so a real run with a bad layout stops before any process starts.
        for line in plan.warnings:
            print(f"warning: {line}", file=sys.stderr)
        if plan.errors:
            print("error: the parallel layout does not fit the model or the cluster:\n"
                  + "\n".join(f"  - {e}" for e in plan.errors), file=sys.stderr)
            return 2

    from megarl.checkpoint.store import CheckpointError
    from megarl.data import DataFormatError
    from megarl.trainer import run  # imported only now: the trainer pulls in megatron, vLLM and Ray

    try:
        run(cfg)
    except (ConfigError, DataFormatError, CheckpointError) as exc:
        # switches a run cannot honour yet, the device (trainer.device), the datasets and the resume
        # checkpoint are checked before any process group or actor starts
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
