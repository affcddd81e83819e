"""`megarl-convert`: megarl/megatron checkpoints <-> HuggingFace folders.

    megarl-convert mcore-to-hf CHECKPOINT OUT_DIR [--hf-config DIR] [--dtype bf16|fp16|fp32]
                               [--max-shard-size 5GB] [--verify] [--overwrite] [--no-progress]
    megarl-convert hf-to-mcore HF_DIR OUT_ROOT [--target-layout tp=2,pp=2,ep=2] [--dtype fp32] [--overwrite]
    megarl-convert verify CHECKPOINT

`verify` checks a step folder (or every complete step of a checkpoint root) against its manifest —
every file present, of the recorded size and CRC-32 — without loading anything: exit 0 when all
verify, 1 when one is damaged (each wrong file is named).

CHECKPOINT is a checkpoint root (its newest complete step is used), a step folder, or a bare megatron
dist-checkpoint folder. Exit code 2 with a one-line reason for bad input (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarl-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    to_hf = sub.add_parser("mcore-to-hf", help="megarl/megatron checkpoint (any layout) -> HF folder, one CPU process")
    to_hf.add_argument("checkpoint")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--hf-config", help="folder with config.json + tokenizer (default: the run's model.path)")
    to_hf.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: as saved)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 100MB (default 5GB)")
    to_hf.add_argument("--verify", action="store_true", help="re-read the output and compare every tensor")
    to_hf.add_argument("--overwrite", action="store_true", help="write into an existing folder (old weight files replaced)")
    to_hf.add_argument("--model", choices=["actor", "critic"], default="actor",
                       help="which model of a PPO checkpoint (the critic becomes *ForTokenClassification, num_labels=1)")
    to_hf.add_argument("--no-progress", action="store_true")

    to_mcore = sub.add_parser("hf-to-mcore", help="HF folder -> model-only megarl checkpoint (loads at any layout)")
    to_mcore.add_argument("hf_dir")
    to_mcore.add_argument("out_root")
    to_mcore.add_argument("--target-layout", help="layout the run will use, checked against the model, e.g. tp=2,pp=2,ep=2")
    to_mcore.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    to_mcore.add_argument("--overwrite", action="store_true")

    verify = sub.add_parser("verify", help="check a checkpoint's files against its manifest, without loading it")
    verify.add_argument("checkpoint", help="a step folder, or a checkpoint root (every complete step is checked)")
    return parser


def _verify(checkpoint: str) -> int:
    from megarl.checkpoint.store import COMPLETE_MARKER, CheckpointError, CheckpointStore, verify_checkpoint

    path = os.path.abspath(checkpoint)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.exists(os.path.join(path, COMPLETE_MARKER)) or os.path.basename(path).startswith("step_"):
        folders = [path]
    else:
        folders = CheckpointStore(path).resume_candidates()
        if not folders:
            raise CheckpointError(f"{path} is neither a checkpoint step folder nor a checkpoint root with a complete step")
    damaged = 0
    for folder in folders:
        report = verify_checkpoint(folder)
        if not report.ok:
            damaged += 1
            print(f"DAMAGED {folder}:\n{report.describe()}")
        elif report.has_manifest:
            print(f"ok      {folder}: {report.files} files, {report.bytes / 1e6:.1f} MB match the manifest "
                  f"({report.seconds:.2f} s)")
        else:
            print(f"ok      {folder}: written before manifests; only its structure was checked")
    return 1 if damaged else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":  # standard library only: no torch import
        from megarl.checkpoint.store import CheckpointError

        try:
            return _verify(args.checkpoint)
        except CheckpointError as err:
            print(f"megarl-convert: error: {err}", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megarl.checkpoint.convert import HfToMcoreOptions, McoreToHfOptions, hf_to_mcore, mcore_to_hf
    from megarl.checkpoint.store import CheckpointError
    from megarl.distributed import LayoutError

    try:
        if args.command == "mcore-to-hf":
            result = mcore_to_hf(args.checkpoint, args.out_dir, McoreToHfOptions(
                max_shard_size=args.max_shard_size, dtype=args.dtype, hf_config_dir=args.hf_config,
                overwrite=args.overwrite, verify=args.verify, progress=not args.no_progress, model=args.model,
            ))
            rate = result.bytes / 1e9 / result.seconds if result.seconds else float("inf")
            print(f"wrote {result.tensors} tensors, {result.bytes / 1e9:.3f} GB in {len(result.files)} file(s) "
                  f"to {result.out_dir} in {result.seconds:.1f} s ({rate:.3f} GB/s)")
            if result.verify_max_abs_diff is not None:
                print(f"verify: every tensor matches the checkpoint; max |diff| vs the saved precision "
                      f"{result.verify_max_abs_diff:.3e}")
        else:
            step_dir = hf_to_mcore(args.hf_dir, args.out_root, HfToMcoreOptions(
                target_layout=args.target_layout, dtype=args.dtype, overwrite=args.overwrite))
            print(f"wrote model-only checkpoint {step_dir}")
    except (CheckpointError, LayoutError, ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"megarl-convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
