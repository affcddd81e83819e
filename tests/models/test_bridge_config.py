"""HF config checks before any megatron model is built (transformers only, no megatron import)."""

import json
import os
import shutil

import pytest

from megarl.models.bridge import load_hf_config_for_bridge


def _variant(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


def test_rope_theta_comes_from_rope_parameters(tiny_moe_dir):
    # transformers 5 keeps rope_theta only inside rope_parameters; mbridge reads hf_config.rope_theta.
    with open(os.path.join(tiny_moe_dir, "config.json")) as f:
        on_disk = json.load(f)
    assert "rope_theta" not in on_disk
    assert load_hf_config_for_bridge(tiny_moe_dir).rope_theta == on_disk["rope_parameters"]["rope_theta"] == 10000.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 512}}, "RoPE scaling 'yarn'"),
        ({"mlp_only_layers": [0]}, "dense layers"),
        ({"decoder_sparse_step": 2}, "dense layers"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True, "sliding_window": 64}, "sliding-window"),
    ],
)
def test_unsupported_model_features_fail_before_building(tiny_moe_dir, tmp_path, changes, message):
    variant = _variant(tiny_moe_dir, str(tmp_path / "variant"), **changes)
    with pytest.raises(NotImplementedError, match=message):
        load_hf_config_for_bridge(variant)
