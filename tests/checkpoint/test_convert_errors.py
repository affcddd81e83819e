"""megarl-convert refuses bad input with a message naming the problem, before writing anything."""

import json
import os
import shutil

import pytest

from megarl.checkpoint.convert import ConversionError, HfToMcoreOptions, McoreToHfOptions, hf_to_mcore, mcore_to_hf
from megarl.checkpoint.store import CheckpointError


@pytest.fixture(scope="module")
def step_dir(tiny_moe_dir, tmp_path_factory):
    """A valid model-only checkpoint of the tiny MoE (store layout, step_00000000)."""
    return hf_to_mcore(tiny_moe_dir, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture
def broken(step_dir, tmp_path):
    """A private copy of the checkpoint to damage: returns its step folder."""
    root = tmp_path / "root"
    shutil.copytree(os.path.dirname(step_dir), root)
    return str(root / os.path.basename(step_dir))


def _rewrite_manifest(step_dir):
    from megarl.checkpoint.manifest import MANIFEST_FILE, build_manifest

    with open(os.path.join(step_dir, MANIFEST_FILE), "w") as f:
        json.dump(build_manifest(step_dir, 0), f)


def _convert(checkpoint, out, **options):
    return mcore_to_hf(checkpoint, str(out), McoreToHfOptions(progress=False, **options))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        _convert(str(tmp_path / "nope"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_without_complete_marker(broken, tmp_path):
    os.remove(os.path.join(broken, "COMPLETE"))
    with pytest.raises(ConversionError, match="incomplete .no COMPLETE marker"):
        _convert(broken, tmp_path / "out")
    with pytest.raises(ConversionError, match="checkpoint root with a complete step"):
        _convert(os.path.dirname(broken), tmp_path / "out")  # the root: no complete step left
    assert not (tmp_path / "out").exists()


def _convert_both_ways(broken, tmp_path, tiny_moe_dir, manifest_message, reader_message):
    """A damaged step folder is refused by its manifest; the bare megatron folder inside it (no
    manifest) still by the dist-checkpoint reader's own checks. Nothing is written either way."""
    with pytest.raises(ConversionError, match=f"is damaged \\(nothing written\\):\n  - {manifest_message}"):
        _convert(broken, tmp_path / "out")
    with pytest.raises(CheckpointError, match=reader_message):
        _convert(os.path.join(broken, "megatron"), tmp_path / "out", hf_config_dir=tiny_moe_dir)
    assert not (tmp_path / "out").exists()


def test_missing_data_file(broken, tmp_path, tiny_moe_dir):
    megatron = os.path.join(broken, "megatron")
    victim = sorted(n for n in os.listdir(megatron) if n.endswith(".distcp"))[0]
    os.remove(os.path.join(megatron, victim))
    _convert_both_ways(broken, tmp_path, tiny_moe_dir, f"megatron/{victim}: missing",
                       f"truncated: 1 of .* data files are missing \\({victim}\\)")


def test_truncated_data_file(broken, tmp_path, tiny_moe_dir):
    megatron = os.path.join(broken, "megatron")
    victim = max((n for n in os.listdir(megatron) if n.endswith(".distcp")), key=lambda n: os.path.getsize(os.path.join(megatron, n)))
    path = os.path.join(megatron, victim)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    _convert_both_ways(broken, tmp_path, tiny_moe_dir,
                       f"megatron/{victim}: {size // 2} bytes, the manifest says {size} \\(truncated",
                       f"truncated: data files shorter than their metadata says \\({victim}\\)")


@pytest.mark.parametrize("victim, message", [(".metadata", "has no .metadata"), ("metadata.json", "metadata.json is missing")])
def test_missing_metadata(broken, tmp_path, tiny_moe_dir, victim, message):
    os.remove(os.path.join(broken, "megatron", victim))
    _convert_both_ways(broken, tmp_path, tiny_moe_dir, f"megatron/{victim}: missing", message)


def test_flipped_bytes_are_caught_by_the_manifest(broken, tmp_path, tiny_moe_dir):
    megatron = os.path.join(broken, "megatron")
    victim = sorted(n for n in os.listdir(megatron) if n.endswith(".distcp"))[0]
    with open(os.path.join(megatron, victim), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ConversionError, match=f"megatron/{victim}: contents differ from the manifest"):
        _convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_from_before_manifests_converts_with_a_notice(broken, tmp_path, tiny_moe_dir, capsys):
    """A real load of an old-format checkpoint (COMPLETE holds the step, no manifest): same weights."""
    from safetensors.torch import load_file

    reference = _convert(broken, tmp_path / "reference")
    os.remove(os.path.join(broken, "MANIFEST.json"))
    with open(os.path.join(broken, "COMPLETE"), "w") as f:
        f.write("0")
    capsys.readouterr()
    result = _convert(broken, tmp_path / "out")
    assert "written before checkpoints had manifests" in capsys.readouterr().err
    (ref_file,), (out_file,) = reference.files, result.files
    ref = load_file(os.path.join(reference.out_dir, ref_file))
    out = load_file(os.path.join(result.out_dir, out_file))
    assert sorted(ref) == sorted(out) and all(ref[k].equal(out[k]) for k in ref)


@pytest.mark.parametrize("field, value, message", [
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (an attribute alias)
    ("num_local_experts", 8, "num_experts=8 in the config but 4 in decoder.layers.mlp.experts.experts.linear_fc2.weight"),
    ("hidden_size", 128, "hidden_size=128 in the config but 64 in embedding.word_embeddings.weight"),
    ("num_hidden_layers", 3, "num_hidden_layers=3 in the config but 2"),
])
def test_hf_config_that_does_not_match_the_tensors(step_dir, tmp_path, field, value, message):
    config_dir = tmp_path / "cfg"
    shutil.copytree(os.path.join(step_dir, "hf_config"), config_dir)
    with open(config_dir / "config.json") as f:
        config = json.load(f)
    config[field] = value
    with open(config_dir / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=message):
        _convert(step_dir, tmp_path / "out", hf_config_dir=str(config_dir))
    assert not (tmp_path / "out").exists()


def test_no_hf_config_anywhere(broken, tmp_path):
    shutil.rmtree(os.path.join(broken, "hf_config"))
    state_path = os.path.join(broken, "trainer_state.json")
    with open(state_path) as f:
        state = json.load(f)
    state["config"]["model"]["path"] = str(tmp_path / "gone")
    with open(state_path, "w") as f:
        json.dump(state, f)
    _rewrite_manifest(broken)  # as if saved so: not damage, a model folder that is gone since
    with pytest.raises(ConversionError, match="has no config.json here: pass --hf-config"):
        _convert(broken, tmp_path / "out")


def test_existing_output_folder_is_left_alone_unless_overwrite(step_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    with pytest.raises(ConversionError, match="exists and is not empty.*--overwrite"):
        _convert(step_dir, out)
    assert sorted(os.listdir(out)) == ["model-00001-of-00002.safetensors", "notes.txt"]
    _convert(step_dir, out, overwrite=True)
    # the stale weight file of an earlier conversion is gone, everything else stays
    assert (out / "notes.txt").read_text() == "mine"
    assert "model-00001-of-00002.safetensors" not in os.listdir(out)
    assert "model.safetensors" in os.listdir(out)


def test_cli_exit_code_and_message(tmp_path, capsys):
    from megarl.checkpoint.convert_cli import main

    assert main(["mcore-to-hf", str(tmp_path / "nope"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["hf-to-mcore", str(tmp_path / "no_model"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_bad_max_shard_size(step_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot parse size '5 parsecs'"):
        _convert(step_dir, tmp_path / "out", max_shard_size="5 parsecs")


@pytest.mark.parametrize("layout, error, message", [
    ("tp=3", "LayoutError", "tp"),
    ("tp=2,ep=3", "LayoutError", "ep"),
    ("tp=2,foo=1", "ConversionError", "bad layout item 'foo=1'"),
])
def test_hf_to_mcore_target_layout_is_validated(tiny_moe_dir, tmp_path, layout, error, message):
    with pytest.raises(ValueError, match=message) as info:
        hf_to_mcore(tiny_moe_dir, str(tmp_path / "out"), HfToMcoreOptions(target_layout=layout))
    assert type(info.value).__name__ == error
    assert not (tmp_path / "out").exists()


def test_hf_to_mcore_existing_output(tiny_moe_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        hf_to_mcore(tiny_moe_dir, str(out))
    assert os.listdir(out) == ["keep"]
