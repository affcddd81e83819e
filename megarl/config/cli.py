"""Command line → resolved, validated config.

    launch/train.py --config configs/qwen3_235b_a22b_grpo.yaml --tp 4 --pp 8 --ep 8 --rollout-tp 16 \
        --rollout.n=16 --optimizer.lr 2e-6 --trainer.logger=[console,tensorboard] --dry-run

Precedence: recipe YAML < overrides in the order given (a later one wins). The first-class flags are
aliases of dotted fields (`--tp` is `--parallel.tp`) and take part in that order like any other.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megarl.config.loader import CliText, ConfigError, from_dict, read_yaml, set_dotted
from megarl.config.resolve import resolve
from megarl.config.schema import MegaRLConfig
from megarl.config.validate import validate

# First-class flags for the knobs changed most often between runs of one recipe.
FLAG_ALIASES: dict[str, str] = {
    "--tp": "parallel.tp",
    "--pp": "parallel.pp",
    "--vpp": "parallel.vpp",
    "--ep": "parallel.ep",
    "--etp": "parallel.etp",
    "--cp": "parallel.cp",
    "--rollout-tp": "rollout.tensor_parallel_size",
    "--nnodes": "trainer.nnodes",
    "--gpus-per-node": "trainer.gpus_per_node",
}


@dataclass
class CliArgs:
    config_path: str | None
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (dotted field, text value), in order
    dry_run: bool = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="megarl RL post-training (GRPO/PPO) on megatron-core. Any config field can be set as "
                    "--section.field=value (e.g. --rollout.n=16 --algorithm.kl_loss_coef=0.001).",
    )
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); omitted = all defaults")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the resolved config and the parallel/memory plan, then exit")
    for flag, dotted in FLAG_ALIASES.items():
        parser.add_argument(flag, metavar="N", help=f"alias of --{dotted}")
    return parser


def parse_cli(argv: list[str]) -> CliArgs:
    """Split argv into the recipe path, --dry-run and ordered (field, text) overrides."""
    parser = _parser()
    known_flags = {"--config", "--dry-run", "-h", "--help"}
    config_path, dry_run, overrides, errors = None, False, [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline_value = token.partition("=")
        if name in ("-h", "--help"):
            parser.parse_args([name])  # prints help and exits
        if name == "--dry-run":
            dry_run = True
            i += 1
            continue
        is_alias = name in FLAG_ALIASES
        is_dotted = name.startswith("--") and "." in name
        is_bare = not name.startswith("-") and eq and "." in name  # hydra style: rollout.n=16
        if not (name == "--config" or is_alias or is_dotted or is_bare):
            close = [f for f in sorted(known_flags | set(FLAG_ALIASES)) if f.startswith(name[:4])] if name else []
            errors.append(f"{token}: unrecognised argument; fields are set as --section.field=value"
                          + (f" (flags: {', '.join(close)})" if close else ""))
            i += 1
            continue
        if eq:
            value = inline_value
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            errors.append(f"{name}: missing value (write {name}=VALUE)")
            i += 1
            continue
        if name == "--config":
            config_path = value
        else:
            dotted = FLAG_ALIASES.get(name) or name.lstrip("-")
            overrides.append((dotted, value))
    if errors:
        raise ConfigError(errors)
    return CliArgs(config_path=config_path, overrides=overrides, dry_run=dry_run)


def build_config(config_path: str | None, overrides: list[tuple[str, str]] = (), *,
                 check_paths: bool = True, check_data_paths: bool = True) -> tuple[MegaRLConfig, list[str]]:
    """Recipe + overrides → (resolved MegaRLConfig, warnings); ConfigError on any problem."""
    data = read_yaml(config_path) if config_path else {}
    for dotted, text in overrides:
        set_dotted(data, dotted, CliText(text))
    cfg = resolve(from_dict(MegaRLConfig, data))
    warnings = validate(cfg, check_paths=check_paths, check_data_paths=check_data_paths)
    return cfg, warnings
