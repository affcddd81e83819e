"""On-disk layout of training checkpoints, written so that a crash never loses the previous one
and damage to a complete one is found before it is loaded.

    <root>/
      latest                    text file naming the newest complete step ("step_00000010")
      step_00000010/
        trainer_state.json      step, data-loader position, metrics history, resolved config
        megatron/               megatron-core dist_checkpointing folder (model + optimizer), any layout
        rng/rank_00000.pt       per-rank RNG states (torch, numpy, python, megatron's tracker)
        COMPLETE                the save finished; names the manifest to expect
        MANIFEST.json           every other file's path, size and CRC-32 (see manifest.py), written last
      .tmp_step_00000012_<id>/  a save in progress (or one a crash interrupted: ignored, cleaned later)
      step_00000008.damaged-<id>/  a damaged checkpoint a re-save of its step moved aside (never deleted)

A save writes everything into a fresh temporary folder, marks it COMPLETE, writes the manifest
(tmp file + rename), renames the folder to its final name (an atomic rename within one filesystem)
and only then rewrites `latest` (tmp file + os.replace). So `latest` always names a complete
checkpoint, whatever moment the process is killed at; the manifest catches what happens to the files
afterwards (a deleted rank file, a truncated copy, flipped bytes). Resuming verifies the checkpoint
first: `auto` skips damaged ones (saying what is wrong) for the newest that verifies. A checkpoint
from before manifests (its COMPLETE holds only the step number) loads with a notice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field

from megarl.checkpoint.manifest import MANIFEST_FILE, ManifestError, build_manifest, check_files, read_manifest

STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
MEGATRON_SUBDIR = "megatron"
CRITIC_SUBDIR = "critic"  # PPO: the critic's Megatron state beside the actor's
# megatron-core's dist-checkpoint files every save has: its own config and torch DCP's global metadata.
MEGATRON_REQUIRED_FILES = ("metadata.json", ".metadata")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or malformed."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _notice(kind: str, text: str) -> None:
    print(f"{kind}: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PendingSave:
    """A save in progress: write into `path`, then `CheckpointStore.commit(pending)`."""

    root: str
    step: int
    path: str
    started: float = field(default_factory=time.monotonic)

    @property
    def megatron_dir(self) -> str:
        return os.path.join(self.path, MEGATRON_SUBDIR)


@dataclass(frozen=True)
class CommitTiming:
    """What the last commit cost: the manifest (checksums + write) against the whole save (begin → latest)."""

    files: int
    bytes: int
    manifest_s: float
    save_s: float

    @property
    def manifest_fraction(self) -> float:
        return self.manifest_s / self.save_s if self.save_s > 0 else 0.0


class CheckpointStore:
    def __init__(self, root: str, keep_last: int | None = None):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"trainer.keep_last_k must be >= 1 (or null to keep all), got {keep_last}")
        self.root = os.path.abspath(root)
        self.keep_last = keep_last
        self.last_commit: CommitTiming | None = None
        self.found_damaged: set[str] = set()  # by resolve_resume: never deleted by a re-save

    # -- writing ---------------------------------------------------------------------------------
    def begin(self, step: int) -> PendingSave:
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, f".tmp_{step_dir_name(step)}_{uuid.uuid4().hex[:8]}")
        os.makedirs(os.path.join(path, MEGATRON_SUBDIR))
        return PendingSave(self.root, step, path)

    def commit(self, pending: PendingSave, trainer_state: dict) -> str:
        """Finish a save whose Megatron and RNG parts are already written. Returns the final folder."""
        _write_json_atomic(os.path.join(pending.path, TRAINER_STATE_FILE), {"step": pending.step, **trainer_state})
        _write_json_atomic(os.path.join(pending.path, COMPLETE_MARKER), {"step": pending.step, "manifest": MANIFEST_FILE})
        manifest_start = time.monotonic()
        manifest = build_manifest(pending.path, pending.step)
        _write_json_atomic(os.path.join(pending.path, MANIFEST_FILE), manifest)
        manifest_s = time.monotonic() - manifest_start
        final = os.path.join(self.root, step_dir_name(pending.step))
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace the older copy
            self._replace_old_copy(final)
        os.rename(pending.path, final)
        _write_text_atomic(os.path.join(self.root, LATEST_FILE), step_dir_name(pending.step))
        self._prune()
        self.last_commit = CommitTiming(len(manifest["files"]), manifest["total_bytes"], manifest_s,
                                        time.monotonic() - pending.started)
        t = self.last_commit
        print(f"checkpoint {step_dir_name(pending.step)}: manifest of {t.files} files ({t.bytes / 1e6:.1f} MB) in "
              f"{t.manifest_s:.3f} s = {100 * t.manifest_fraction:.2f}% of the {t.save_s:.2f} s save", flush=True)
        return final

    def _replace_old_copy(self, final: str) -> None:
        """A good older copy of the step is removed; a damaged one (found so at resume, or with a file
        missing or of the wrong size now; re-reading every byte here would cost a whole read of
        the checkpoint) is kept aside for the user to inspect."""
        if final not in self.found_damaged and verify_checkpoint(final, checksums=False).ok:
            shutil.rmtree(final)
            return
        aside = f"{final}.damaged-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        _notice("warning", f"the damaged checkpoint {final} was moved to {aside} (kept, not deleted) so this step "
                           "can be saved again")

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
        candidates = self.resume_candidates()
        return candidates[0] if candidates else None

    def resume_candidates(self) -> list[str]:
        """Complete checkpoint folders in the order `auto` tries them: the one `latest` names, then
        the other complete steps, newest first."""
        steps = [os.path.join(self.root, step_dir_name(s)) for s in reversed(self.complete_steps())]
        named = self.latest_pointer()
        if named in steps:  # a pointer to a missing or incomplete folder is stale: ignore it
            steps.remove(named)
            steps.insert(0, named)
        return steps

    def latest_pointer(self) -> str | None:
        """The folder the `latest` file names (it may be missing or incomplete), or None."""
        pointer = os.path.join(self.root, LATEST_FILE)
        if not os.path.exists(pointer):
            return None
        with open(pointer) as f:
            return os.path.join(self.root, f.read().strip())


@dataclass
class CheckpointReport:
    """What verifying a checkpoint folder found. problems: one line each, naming the file."""

    path: str
    problems: list[str]
    has_manifest: bool
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return "\n".join(f"  - {p}" for p in self.problems)


def verify_checkpoint(path: str, checksums: bool = True) -> CheckpointReport:
    """Check a checkpoint folder whole without loading it: its structure, then every file the
    manifest lists (present, same size and, with checksums, same CRC-32). A folder from before
    manifests gets the structural checks only (has_manifest False)."""
    start = time.monotonic()
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return CheckpointReport(path, ["the folder does not exist"], has_manifest=False)
    marker = os.path.join(path, COMPLETE_MARKER)
    if not os.path.exists(marker):
        return CheckpointReport(path, [f"no {COMPLETE_MARKER} marker: the save was interrupted (incomplete)"],
                                has_manifest=False)
    expects_manifest = _marker_expects_manifest(marker)
    problems: list[str] = []
    report = CheckpointReport(path, problems, has_manifest=False)
    if expects_manifest or os.path.exists(os.path.join(path, MANIFEST_FILE)):
        try:
            manifest = read_manifest(path)
        except FileNotFoundError:
            problems.append(f"{MANIFEST_FILE}: missing (this checkpoint was written with one; its files cannot be "
                            "verified)")
        except (ManifestError, OSError) as err:
            problems.append(f"{MANIFEST_FILE}: {err}")
        else:
            report.has_manifest = True
            report.files, report.bytes = len(manifest["files"]), manifest.get("total_bytes", 0)
            problems.extend(check_files(path, manifest, checksums))
    reported = {problem.split(": ")[0] for problem in problems}  # a file the manifest already named
    problems.extend(p for p in _structure_problems(path) if p.split(": ")[0] not in reported)
    report.seconds = time.monotonic() - start
    return report


def _marker_expects_manifest(marker: str) -> bool:
    """COMPLETE of a manifest-era save is JSON naming the manifest; an older one holds just the step."""
    try:
        with open(marker) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and bool(content.get("manifest"))


def _structure_problems(path: str) -> list[str]:
    problems = []
    try:
        with open(os.path.join(path, TRAINER_STATE_FILE)) as f:
            state = json.load(f)
        if "step" not in state:
            problems.append(f"{TRAINER_STATE_FILE}: has no 'step'")
    except FileNotFoundError:
        problems.append(f"{TRAINER_STATE_FILE}: missing")
    except (OSError, json.JSONDecodeError) as err:
        problems.append(f"{TRAINER_STATE_FILE}: cannot read it ({err})")
    for name in MEGATRON_REQUIRED_FILES:
        if not os.path.exists(os.path.join(path, MEGATRON_SUBDIR, name)):
            problems.append(f"{MEGATRON_SUBDIR}/{name}: missing (no Megatron state)")
    return problems


def resolve_resume(resume: str, store: CheckpointStore) -> str | None:
    """`resume` is 'auto', 'disable', or a checkpoint folder path; returns the folder to load (or None).

    Every candidate is verified here, before any worker starts. 'auto' tries the checkpoint `latest`
    names, then older complete ones, newest first; each damaged one is reported (which files are
    wrong) and left on disk. A path is loaded only if it verifies. CheckpointError otherwise."""
    if resume == "disable":
        return None
    if resume != "auto":
        return validate_checkpoint(resume)
    skipped: list[CheckpointReport] = []
    named = store.latest_pointer()
    if named and os.path.isdir(named) and not os.path.exists(os.path.join(named, COMPLETE_MARKER)):
        skipped.append(verify_checkpoint(named))  # its COMPLETE marker was removed after the save
        store.found_damaged.add(named)
        _notice("warning", f"checkpoint {named} (named by {LATEST_FILE}) is damaged; skipping it (it is kept on "
                           f"disk):\n{skipped[-1].describe()}")
    for path in store.resume_candidates():
        report = verify_checkpoint(path)
        if not report.ok:
            skipped.append(report)
            store.found_damaged.add(path)
            _notice("warning", f"checkpoint {path} is damaged; skipping it (it is kept on disk):\n{report.describe()}")
            continue
        if skipped:
            names = ", ".join(os.path.basename(r.path) for r in skipped)
            _notice("warning", f"trainer.resume=auto: resuming from {os.path.basename(path)} instead of the damaged "
                               f"{names}; the steps after {os.path.basename(path)} are trained again")
        _announce(report)
        return path
    if skipped:
        raise CheckpointError(
            f"trainer.resume=auto: no checkpoint under {store.root} verifies ({len(skipped)} damaged, listed above); "
            "repair or restore one, point trainer.resume at a good copy, or set trainer.resume=disable to start afresh")
    return None


def validate_checkpoint(path: str) -> str:
    """Verify one checkpoint folder before any work starts; return its absolute path or raise
    CheckpointError naming every missing or wrong file."""
    report = verify_checkpoint(path)
    if report.ok:
        _announce(report)
        return report.path
    if report.problems == ["the folder does not exist"]:
        raise CheckpointError(f"checkpoint folder {report.path} does not exist (trainer.resume)")
    if not os.path.exists(os.path.join(report.path, COMPLETE_MARKER)):
        raise CheckpointError(
            f"checkpoint {report.path} is incomplete (no {COMPLETE_MARKER} marker): a save was interrupted; "
            f"resume from an earlier step folder or use trainer.resume=auto")
    raise CheckpointError(f"checkpoint {report.path} is damaged:\n{report.describe()}\n"
                          "resume from another step folder, or use trainer.resume=auto to take the newest one that verifies")


def _announce(report: CheckpointReport) -> None:
    if report.has_manifest:
        print(f"checkpoint {report.path} verified: {report.files} files, {report.bytes / 1e6:.1f} MB in "
              f"{report.seconds:.2f} s", flush=True)
    else:
        _notice("notice", f"checkpoint {report.path} was written before checkpoints had manifests: only its "
                          "structure was checked (not every file's size and checksum); loading it as it is")


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
