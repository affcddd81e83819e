"""On-disk layout of training checkpoints, written so that a crash never loses the previous one.

    <root>/
      latest                    text file naming the newest complete step ("step_00000010")
      step_00000010/
        COMPLETE                written last, inside the temporary folder, before the rename
        trainer_state.json      step, data-loader position, metrics history, resolved config
        megatron/               megatron-core dist_checkpointing folder (model + optimizer), any layout
        rng/rank_00000.pt       per-rank RNG states (torch, numpy, python, megatron's tracker)
      .tmp_step_00000012_<id>/  a save in progress (or one a crash interrupted: ignored, cleaned later)

A save writes everything into a fresh temporary folder, marks it COMPLETE, renames it to its final
name (an atomic rename within one filesystem) and only then rewrites `latest` (tmp file + os.replace).
So `latest` always names a complete checkpoint, whatever moment the process is killed at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass

STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
MEGATRON_SUBDIR = "megatron"
CRITIC_SUBDIR = "critic"  # PPO: the critic's Megatron state beside the actor's


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or malformed."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class PendingSave:
    """A save in progress: write into `path`, then `CheckpointStore.commit(pending)`."""

    root: str
    step: int
    path: str

    @property
    def megatron_dir(self) -> str:
        return os.path.join(self.path, MEGATRON_SUBDIR)


class CheckpointStore:
    def __init__(self, root: str, keep_last: int | None = None):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"trainer.keep_last_k must be >= 1 (or null to keep all), got {keep_last}")
        self.root = os.path.abspath(root)
        self.keep_last = keep_last

    # -- writing ---------------------------------------------------------------------------------
    def begin(self, step: int) -> PendingSave:
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, f".tmp_{step_dir_name(step)}_{uuid.uuid4().hex[:8]}")
        os.makedirs(os.path.join(path, MEGATRON_SUBDIR))
        return PendingSave(self.root, step, path)

    def commit(self, pending: PendingSave, trainer_state: dict) -> str:
        """Finish a save whose Megatron and RNG parts are already written. Returns the final folder."""
        _write_json_atomic(os.path.join(pending.path, TRAINER_STATE_FILE), {"step": pending.step, **trainer_state})
        with open(os.path.join(pending.path, COMPLETE_MARKER), "w") as f:
            f.write(str(pending.step))
            f.flush()
            os.fsync(f.fileno())
        final = os.path.join(self.root, step_dir_name(pending.step))
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace the older copy
            shutil.rmtree(final)
        os.rename(pending.path, final)
        _write_text_atomic(os.path.join(self.root, LATEST_FILE), step_dir_name(pending.step))
        self._prune()
        return final

    def _prune(self) -> None:
        for name in os.listdir(self.root):
            if name.startswith(".tmp_"):  # saves that a crash interrupted
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if self.keep_last is None:
            return
        for step in self.complete_steps()[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.root, step_dir_name(step)), ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        steps = []
        for name in os.listdir(self.root):
            match = STEP_DIR_RE.match(name)
            if match and os.path.exists(os.path.join(self.root, name, COMPLETE_MARKER)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> str | None:
        """The newest complete checkpoint folder, or None when there is none."""
        pointer = os.path.join(self.root, LATEST_FILE)
        if os.path.exists(pointer):
            with open(pointer) as f:
                path = os.path.join(self.root, f.read().strip())
            if os.path.exists(os.path.join(path, COMPLETE_MARKER)):
                return path
        steps = self.complete_steps()  # pointer missing or stale: fall back to the newest complete one
        return os.path.join(self.root, step_dir_name(steps[-1])) if steps else None


def resolve_resume(resume: str, store: CheckpointStore) -> str | None:
    """`resume` is 'auto' (latest if any), 'disable', or a checkpoint folder path."""
    if resume == "disable":
        return None
    if resume == "auto":
        path = store.latest()
        return validate_checkpoint(path) if path else None
    return validate_checkpoint(resume)


def validate_checkpoint(path: str) -> str:
    """Check a checkpoint folder before any work starts; return its absolute path."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist (trainer.resume)")
    if not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker): a save was interrupted; "
            f"resume from an earlier step folder or use trainer.resume=auto"
        )
    state_file = os.path.join(path, TRAINER_STATE_FILE)
    try:
        with open(state_file) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot read {TRAINER_STATE_FILE}: {err}") from err
    if "step" not in state:
        raise CheckpointError(f"checkpoint {path}: {TRAINER_STATE_FILE} has no 'step'")
    if not os.path.exists(os.path.join(path, MEGATRON_SUBDIR, "metadata.json")):
        raise CheckpointError(f"checkpoint {path}: no Megatron state ({MEGATRON_SUBDIR}/metadata.json missing)")
    return path


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, TRAINER_STATE_FILE)) as f:
        return json.load(f)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: str, obj) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))
