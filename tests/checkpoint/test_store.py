import json
import os

import pytest

from megarl.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    read_trainer_state,
    resolve_resume,
    validate_checkpoint,
)


def _save(store, step, **state):
    pending = store.begin(step)
    with open(os.path.join(pending.megatron_dir, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist"}, f)
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
        ("bad_state", "cannot read trainer_state.json"),
        ("no_megatron", "no Megatron state"),
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
