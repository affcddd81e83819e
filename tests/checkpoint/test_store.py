import json
import os
import re

import pytest

from megarl.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    read_trainer_state,
    resolve_resume,
    validate_checkpoint,
    verify_checkpoint,
)


def _save(store, step, **state):
    """A checkpoint with the files a real save has (placeholders for megatron's)."""
    pending = store.begin(step)
    with open(os.path.join(pending.megatron_dir, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist"}, f)
    for name in (".metadata", "__0_0.distcp"):
        with open(os.path.join(pending.megatron_dir, name), "wb") as f:
            f.write(bytes(range(256)) * 4)
    os.makedirs(os.path.join(pending.path, "rng"))
    for rank in (0, 1):
        with open(os.path.join(pending.path, "rng", f"rank_{rank:05d}.pt"), "wb") as f:
            f.write(b"rng state %d" % rank)
    return store.commit(pending, state)


def test_latest_names_the_newest_complete_step_and_keep_last_prunes(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        _save(store, step, loader={"pos": step})
    assert store.complete_steps() == [2, 3]
    assert os.path.basename(store.latest()) == "step_00000003"
    assert read_trainer_state(store.latest()) == {"step": 3, "loader": {"pos": 3}}


def test_an_interrupted_save_leaves_the_previous_checkpoint_as_latest(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 5)
    pending = store.begin(6)  # "crash": megatron files half written, never committed
    with open(os.path.join(pending.megatron_dir, "__0_0.distcp"), "wb") as f:
        f.write(b"partial")
    assert os.path.basename(resolve_resume("auto", store)) == "step_00000005"
    _save(store, 7)  # the next successful save cleans the interrupted one up
    assert not any(name.startswith(".tmp_") for name in os.listdir(tmp_path))


def test_resume_modes(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert resolve_resume("auto", store) is None
    path = _save(store, 2)
    assert resolve_resume("disable", store) is None
    assert resolve_resume(path, store) == path


def test_a_stale_latest_pointer_falls_back_to_the_newest_complete_step(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 1)
    with open(tmp_path / "latest", "w") as f:
        f.write("step_00000009")
    assert os.path.basename(store.latest()) == "step_00000001"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "does not exist"),
        ("no_marker", "incomplete"),
        ("bad_state", "trainer_state.json: 10 bytes, the manifest says 15 .truncated"),
        ("no_megatron", "megatron/metadata.json: missing"),
    ],
)
def test_malformed_checkpoints_are_rejected_with_a_specific_message(tmp_path, damage, message):
    store = CheckpointStore(str(tmp_path))
    path = _save(store, 1)
    if damage == "missing":
        path = str(tmp_path / "nope")
    elif damage == "no_marker":
        os.remove(os.path.join(path, "COMPLETE"))
    elif damage == "bad_state":
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            f.write("{truncated")
    elif damage == "no_megatron":
        os.remove(os.path.join(path, "megatron", "metadata.json"))
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(path)


def test_the_manifest_lists_every_file_with_size_and_crc32(tmp_path):
    import zlib

    path = _save(CheckpointStore(str(tmp_path)), 3, loader={"pos": 3})
    with open(os.path.join(path, "MANIFEST.json")) as f:
        manifest = json.load(f)
    assert sorted(manifest["files"]) == ["COMPLETE", "megatron/.metadata", "megatron/__0_0.distcp", "megatron/metadata.json",
                                         "rng/rank_00000.pt", "rng/rank_00001.pt", "trainer_state.json"]
    entry = manifest["files"]["rng/rank_00001.pt"]
    assert entry == {"size": len(b"rng state 1"), "crc32": f"{zlib.crc32(b'rng state 1'):08x}"}
    assert manifest["step"] == 3 and manifest["total_bytes"] == sum(e["size"] for e in manifest["files"].values())


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage, message", [
    ("rng_missing", "rng/rank_00001.pt: missing"),
    ("data_missing", "megatron/__0_0.distcp: missing"),
    ("truncated", "megatron/__0_0.distcp: 512 bytes, the manifest says 1024 (truncated or partly copied)"),
    ("flipped", "megatron/__0_0.distcp: contents differ from the manifest"),
    ("metadata_missing", "megatron/.metadata: missing"),
    ("manifest_missing", "MANIFEST.json: missing (this checkpoint was written with one"),
    ("manifest_cut", "MANIFEST.json: MANIFEST.json is not valid JSON"),
])
def test_damage_to_the_latest_is_named_and_auto_falls_back_to_the_previous_good_one(tmp_path, capsys, damage, message):
    store = CheckpointStore(str(tmp_path))
    good, latest = _save(store, 2), _save(store, 4)
    capsys.readouterr()
    distcp = os.path.join(latest, "megatron", "__0_0.distcp")
    if damage == "rng_missing":
        os.remove(os.path.join(latest, "rng", "rank_00001.pt"))
    elif damage == "data_missing":
        os.remove(distcp)
    elif damage == "truncated":
        os.truncate(distcp, 512)
    elif damage == "flipped":
        _flip_byte(distcp, 700)
    elif damage == "metadata_missing":
        os.remove(os.path.join(latest, "megatron", ".metadata"))
    elif damage == "manifest_missing":
        os.remove(os.path.join(latest, "MANIFEST.json"))
    elif damage == "manifest_cut":
        os.truncate(os.path.join(latest, "MANIFEST.json"), 40)

    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {latest} is damaged:\n  - {message}")):
        resolve_resume(latest, store)  # an explicit path: refused
    assert resolve_resume("auto", store) == good
    err = capsys.readouterr().err
    assert f"checkpoint {latest} is damaged; skipping it (it is kept on disk):\n  - {message}" in err
    assert "resuming from step_00000002 instead of the damaged step_00000004" in err
    assert os.path.isdir(latest) and store.complete_steps() == [2, 4]  # never deleted


def test_only_the_damaged_file_is_reported(tmp_path):
    import zlib

    path = _save(CheckpointStore(str(tmp_path)), 1)
    _flip_byte(os.path.join(path, "rng", "rank_00000.pt"), 0)
    report = verify_checkpoint(path)
    assert report.has_manifest and report.files == 7
    flipped, original = bytes([ord("r") ^ 0xFF]) + b"ng state 0", b"rng state 0"
    assert report.problems == [f"rng/rank_00000.pt: contents differ from the manifest (crc32 "
                               f"{zlib.crc32(flipped):08x}, expected {zlib.crc32(original):08x})"]


def test_auto_with_every_checkpoint_damaged_refuses_to_start_afresh(tmp_path, capsys):
    store = CheckpointStore(str(tmp_path))
    for step in (1, 2):
        os.remove(os.path.join(_save(store, step), "rng", "rank_00000.pt"))
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies \\(2 damaged, listed above\\).*resume=disable"):
        resolve_resume("auto", store)
    assert capsys.readouterr().err.count("rng/rank_00000.pt: missing") == 2


def test_a_checkpoint_from_before_manifests_loads_with_a_notice(tmp_path, capsys):
    store = CheckpointStore(str(tmp_path))
    path = _save(store, 6)
    os.remove(os.path.join(path, "MANIFEST.json"))
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        f.write("6")  # what saves before manifests wrote
    assert resolve_resume("auto", store) == path
    assert resolve_resume(path, store) == path
    err = capsys.readouterr().err
    assert err.count(f"notice: checkpoint {path} was written before checkpoints had manifests") == 2
    os.remove(os.path.join(path, "megatron", ".metadata"))  # its structure is still checked
    with pytest.raises(CheckpointError, match="megatron/.metadata: missing"):
        validate_checkpoint(path)


def test_re_saving_a_damaged_step_moves_it_aside_and_replaces_a_good_one(tmp_path):
    store = CheckpointStore(str(tmp_path))
    path = _save(store, 4)
    _save(store, 4)  # good older copy: replaced
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000004"]
    os.remove(os.path.join(path, "rng", "rank_00001.pt"))
    _save(store, 4)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("step_00000004.damaged-")]
    assert len(aside) == 1 and os.path.exists(tmp_path / aside[0] / "rng" / "rank_00000.pt")
    assert verify_checkpoint(path).ok and store.complete_steps() == [4]


def test_verify_cli(tmp_path, capsys):
    from megarl.checkpoint.convert_cli import main

    store = CheckpointStore(str(tmp_path))
    _save(store, 1)
    latest = _save(store, 2)
    assert main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok      ") == 2 and "7 files" in out
    os.truncate(os.path.join(latest, "rng", "rank_00001.pt"), 3)
    assert main(["verify", latest]) == 1
    assert f"DAMAGED {latest}:\n  - rng/rank_00001.pt: 3 bytes, the manifest says 11" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_latest_whose_complete_marker_was_removed_is_reported_and_skipped(tmp_path, capsys):
    store = CheckpointStore(str(tmp_path))
    good, latest = _save(store, 2), _save(store, 4)
    os.remove(os.path.join(latest, "COMPLETE"))
    assert resolve_resume("auto", store) == good
    err = capsys.readouterr().err
    assert f"checkpoint {latest} (named by latest) is damaged" in err and "no COMPLETE marker" in err
    assert "resuming from step_00000002 instead of the damaged step_00000004" in err


def test_a_step_auto_found_damaged_is_kept_aside_when_saved_again(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 2)
    latest = _save(store, 4)
    _flip_byte(os.path.join(latest, "megatron", "__0_0.distcp"), 3)  # same size: only the checksum tells
    assert os.path.basename(resolve_resume("auto", store)) == "step_00000002"
    _save(store, 4)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("step_00000004.damaged-")]
    assert len(aside) == 1 and not verify_checkpoint(str(tmp_path / aside[0])).ok
    assert verify_checkpoint(latest).ok
