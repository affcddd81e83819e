"""HF safetensors -> sharded megatron model -> export_hf_weights is bit-exact, at many layouts.

One gloo world per world size runs every layout in turn (megatron import and process start cost
10-25 s per world). Per layout and rank: the exported names are exactly the safetensors file's (no
duplicates, every expert once), every tensor is torch.equal to the file's, and -- without PP -- the
megatron logits of a fixed token sequence match HF transformers' on the same folder (without CP,
too). The forward check catches mirror-image mistakes that a load+export round trip alone would
hide (e.g. TP shards swapped on load and swapped back on export). A model left at random
initialisation is the negative control: both checks must fail for it.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megarl.testing.distributed import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

TOKENS = [[5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 2, 180]]  # [batch=1, seq=12]; 12 divisible by TP 2 (SP)
LOGITS_TOLERANCE = 1e-4


def _file_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(hf_dir, name)))
    return tensors


def _hf_logits(hf_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits  # [batch, seq, vocab]


def _megatron_logits(handle) -> torch.Tensor:
    """Full-vocab logits [batch, seq, vocab] of a PP=1 model (TP shards gathered)."""
    from megatron.core import parallel_state as mpu

    model = handle.unwrapped_chunks()[0]
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)
    tp = mpu.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=mpu.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., : handle.hf_config.vocab_size]  # drop rows added by make_vocab_size_divisible_by


def check_layouts(model_dirs: dict[str, str], cases: list[tuple[str, dict, dict]], save_dir: str | None = None) -> list[dict]:
    """Rank body: for each (model key, ParallelLayout fields, build kwargs) build, export and compare.

    The first case with TP > 1 is also saved with `save_hf_checkpoint` to `save_dir` (small shards).
    """
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model
    from megarl.models.export import export_hf_weights, save_hf_checkpoint

    hf_logits_cache: dict[str, torch.Tensor] = {}
    results = []
    for key, layout_fields, build_kwargs in cases:
        hf_dir = model_dirs[key]
        layout = ParallelLayout(**layout_fields)
        init_distributed(layout)
        handle = build_megatron_model(hf_dir, layout, **build_kwargs)
        expected = _file_tensors(hf_dir)
        exported, mismatched = [], []
        for name, tensor in export_hf_weights(handle):
            exported.append(name)
            if name in expected and not torch.equal(tensor, expected[name]):
                mismatched.append(name)
        logits_diff = None
        if layout.pp == 1 and layout.cp == 1:  # PP/CP forwards need the schedule / sequence split
            if key not in hf_logits_cache:
                hf_logits_cache[key] = _hf_logits(hf_dir)
            logits_diff = (_megatron_logits(handle) - hf_logits_cache[key]).abs().max().item()
        results.append(dict(
            case=f"{key} {layout.describe()} {build_kwargs}",
            missing=sorted(set(expected) - set(exported)),
            extra=sorted(set(exported) - set(expected)),
            duplicates=len(exported) - len(set(exported)),
            mismatched=mismatched,
            logits_max_abs_diff=logits_diff,
            any_requires_grad=any(p.requires_grad for c in handle.chunks for p in c.parameters()),
            trainable=handle.trainable,
            loaded=build_kwargs.get("load_weights", True),
            layers_per_chunk=[len(chunk.decoder.layers) for chunk in handle.unwrapped_chunks()],
            embedding_rows=[tuple(chunk.embedding.word_embeddings.weight.shape) for chunk in handle.unwrapped_chunks()
                            if hasattr(chunk, "embedding")],
        ))
        if save_dir is not None and layout.tp > 1:
            save_hf_checkpoint(handle, save_dir, max_shard_bytes=64 * 1024)
            save_dir = None
        del handle
        reset_model_parallel()
    results.append(_stale_handle_is_refused(model_dirs["qwen3"]))
    return results


def _stale_handle_is_refused(hf_dir: str) -> dict:
    """A handle whose process groups were destroyed (reset + re-init) must raise, not hang; so must
    building for a layout other than the initialised one."""
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model
    from megarl.models.export import export_hf_weights

    layout = ParallelLayout()
    init_distributed(layout)
    handle = build_megatron_model(hf_dir, layout)
    reset_model_parallel()
    init_distributed(layout)
    try:
        next(export_hf_weights(handle))
        refused = False
    except RuntimeError:
        refused = True
    try:  # the parallel state is TP1; a TP2 layout must be refused before anything is built
        build_megatron_model(hf_dir, ParallelLayout(tp=2))
        mismatch_refused = False
    except ValueError as error:
        mismatch_refused = "re-run init_distributed" in str(error)
    reset_model_parallel()
    return dict(case="stale handle / layout mismatch", stale_handle_refused=refused and mismatch_refused)


def _assert_all_exact(per_rank: list[list[dict]]) -> None:
    for rank, results in enumerate(per_rank):
        for result in results:
            where = f"rank {rank}, {result['case']}"
            if "stale_handle_refused" in result:
                assert result["stale_handle_refused"], where
                continue
            if not result["loaded"]:  # negative control: random weights must fail both checks
                assert len(result["mismatched"]) == len(set(result["mismatched"])) > 10, where
                assert result["logits_max_abs_diff"] > 0.1, where
                continue
            assert result["missing"] == [] and result["extra"] == [], where
            assert result["duplicates"] == 0, where
            assert result["mismatched"] == [], where
            assert result["any_requires_grad"] == result["trainable"], where
            if result["logits_max_abs_diff"] is not None:
                assert result["logits_max_abs_diff"] < LOGITS_TOLERANCE, where
            print(f"{where}: exact; logits max|diff| {result['logits_max_abs_diff']}")


@pytest.fixture(scope="module")
def model_dirs(tiny_models, tmp_path_factory):
    """The tiny models plus a 4-layer Qwen3-MoE (for PP2 x VPP2), a Qwen2 with 2 KV heads (the tiny one
    has 1, which TP2 cannot split), a tied-embedding Qwen3 and a Qwen3-MoE with norm_topk_prob=false."""
    from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bridge_models")
    dirs = dict(tiny_models)
    dirs["qwen3_moe_4layers"] = write_tiny_model(str(root / "qwen3_moe_4layers"), TinyModelSpec(num_layers=4))
    dirs["qwen2_2kv"] = write_tiny_model(str(root / "qwen2_2kv"), TinyModelSpec(arch="qwen2", hidden_size=128))
    tied = str(root / "qwen3_tied")
    shutil.copytree(tiny_models["qwen3"], tied)
    with open(os.path.join(tied, "config.json")) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = True
    with open(os.path.join(tied, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = load_file(os.path.join(tied, "model.safetensors"))
    del tensors["lm_head.weight"]  # a tied HF checkpoint stores only the embedding
    save_file(tensors, os.path.join(tied, "model.safetensors"), metadata={"format": "pt"})
    dirs["qwen3_tied"] = tied
    unnormalised = str(root / "qwen3_moe_no_topk_norm")
    shutil.copytree(tiny_models["qwen3_moe"], unnormalised)
    with open(os.path.join(unnormalised, "config.json")) as f:
        config = json.load(f)
    config["norm_topk_prob"] = False  # top-k probabilities straight from the full softmax
    with open(os.path.join(unnormalised, "config.json"), "w") as f:
        json.dump(config, f)
    dirs["qwen3_moe_no_topk_norm"] = unnormalised
    return dirs


WORLD2_CASES = [
    ("qwen3_moe", {}, {}),
    ("qwen3_moe", {"tp": 2}, {}),
    ("qwen3_moe", {"tp": 2, "etp": 1}, {}),
    ("qwen3_moe", {"pp": 2}, {}),
    ("qwen3_moe", {"ep": 2}, {"wrap_with_ddp": True}),
    ("qwen3_moe", {"cp": 2}, {}),
    ("qwen3_moe_no_topk_norm", {"ep": 2}, {}),
    ("qwen3_moe_4layers", {"pp": 2, "vpp": 2}, {}),
    ("qwen3_moe_4layers", {"pp": 2, "num_layers_in_last_pipeline_stage": 1}, {}),  # 3 + 1 layers
    ("qwen3", {}, {"trainable": False}),
    ("qwen3", {}, {"load_weights": False}),
    ("qwen3", {"tp": 2}, {}),
    ("qwen3", {"tp": 2}, {"make_vocab_size_divisible_by": 384}),  # vocab 512 padded to 768
    ("qwen2", {}, {}),
    ("qwen2_2kv", {"tp": 2}, {}),
    ("qwen3_tied", {}, {}),
    ("qwen3_tied", {"pp": 2}, {}),
]

WORLD4_CASES = [
    ("qwen3_moe", {"tp": 2, "ep": 2}, {}),
    ("qwen3_moe", {"tp": 2, "ep": 2, "etp": 1}, {}),
    ("qwen3_moe", {"tp": 2, "pp": 2}, {}),
    ("qwen3_moe", {"pp": 2, "ep": 2}, {}),
    ("qwen3_moe", {"ep": 4}, {}),
]


def test_roundtrip_and_forward_world2(model_dirs, tmp_path):
    saved = str(tmp_path / "saved")
    per_rank = run_on_ranks(check_layouts, 2, args=(model_dirs, WORLD2_CASES, saved), timeout=300)
    _assert_all_exact(per_rank)
    uneven = WORLD2_CASES.index(("qwen3_moe_4layers", {"pp": 2, "num_layers_in_last_pipeline_stage": 1}, {}))
    vpp = WORLD2_CASES.index(("qwen3_moe_4layers", {"pp": 2, "vpp": 2}, {}))
    assert [r[uneven]["layers_per_chunk"] for r in per_rank] == [[3], [1]]
    assert [r[vpp]["layers_per_chunk"] for r in per_rank] == [[1, 1], [1, 1]]
    padded = WORLD2_CASES.index(("qwen3", {"tp": 2}, {"make_vocab_size_divisible_by": 384}))
    assert [r[padded]["embedding_rows"] for r in per_rank] == [[(384, 64)], [(384, 64)]]

    # The TP2 Qwen3-MoE saved in 64 KiB shards: same tensors as the source, loadable by transformers.
    with open(os.path.join(saved, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1 and all(os.path.exists(os.path.join(saved, shard)) for shard in shards)
    original, written = _file_tensors(model_dirs["qwen3_moe"]), _file_tensors(saved)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[name], original[name]) for name in original)
    assert torch.equal(_hf_logits(saved), _hf_logits(model_dirs["qwen3_moe"]))


@pytest.mark.slow
def test_roundtrip_and_forward_world4(model_dirs):
    _assert_all_exact(run_on_ranks(check_layouts, 4, args=(model_dirs, WORLD4_CASES), timeout=300))
