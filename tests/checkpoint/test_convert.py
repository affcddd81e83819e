"""megarl-convert on real checkpoints: a tiny Qwen3-MoE trained one optimizer step at TP2xEP2 and at
PP2 (one gloo world of 4 ranks, run once for the module), saved in the trainer's store layout,
converted to HF in this single process: transformers' forward equals Megatron's, every tensor equals
the live model's export bit for bit. HF -> mcore -> HF is bit-exact, and the model-only checkpoint
loads at TP2xPP2. Error cases of both directions are in test_convert_errors.py."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

from megarl.testing.distributed import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {"tp2ep2": {"tp": 2, "pp": 1, "ep": 2}, "pp2": {"tp": 1, "pp": 2, "ep": 1}}


def _config(model_dir, tp, pp, ep):
    from megarl.config import load_config

    return load_config(None, {
        "model.path": model_dir, "model.dtype": "fp32", "data.train_files": ["unused.parquet"],
        "parallel.tp": tp, "parallel.pp": pp, "parallel.ep": ep,
        "optimizer.lr": 1e-2, "optimizer.weight_decay": 0.0, "optimizer.lr_warmup_steps": 0,
        "actor.ppo_mini_batch_size": 2, "actor.micro_batch_size": 2, "data.train_batch_size": 4,
        "rollout.n": 2, "rollout.max_new_tokens": 8, "trainer.nnodes": 1,
        "trainer.gpus_per_node": int(os.environ.get("WORLD_SIZE", "1")),
    }, check_paths=False)


def _sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (9 + (i * 3) % 7,), generator=g).tolist() for i in range(8)]


def _train_batch():
    from megarl.models.batch import SequenceBatch

    seqs = _sequences()
    masks = [[0.0] * (len(s) - 4) + [1.0] * 4 for s in seqs]
    advs = [[0.0] * (len(s) - 4) + [(-1.0) ** i * (0.5 + 0.1 * i)] * 4 for i, s in enumerate(seqs)]
    return SequenceBatch.from_sequences(seqs, loss_mask=masks, advantages=advs, old_logprobs=[[0.0] * len(s) for s in seqs],
                                        rollout_logprobs=[[0.0] * len(s) for s in seqs])


def _world(model_dir, work_dir, model_only_megatron_dir):
    """Per layout: one optimizer step, Megatron log-probs of the probe sequences, the live model's HF
    export, a checkpoint in the store layout. Then the model-only checkpoint loaded at TP2xPP2."""
    import torch.distributed as dist

    from megarl.algorithms import compute_loss_normalisers, policy_loss_fn
    from megarl.checkpoint.megatron_state import load_megatron_state
    from megarl.checkpoint.store import CheckpointStore
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model
    from megarl.models.export import export_hf_weights
    from megarl.trainer.train_worker import MegatronTrainWorker

    results = {}
    for name, sizes in LAYOUTS.items():
        cfg = _config(model_dir, **sizes)
        worker = MegatronTrainWorker(cfg, total_optimizer_steps=4)
        batch = _train_batch()
        worker.actor.train_step(batch, policy_loss_fn(worker.loss_options, compute_loss_normalisers(batch.fields["loss_mask"])))
        logprobs, _ = worker.actor.forward_logprobs(batch)
        weights = worker.export_weights()
        store = CheckpointStore(os.path.join(work_dir, name))
        pending = [store.begin(1) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(pending, 0)
        worker.save_checkpoint(pending[0].path)
        if dist.get_rank() == 0:
            store.commit(pending[0], {"config": dataclasses.asdict(cfg)})
        dist.barrier()
        results[name] = {"logprobs": logprobs, "weights": weights}
        del worker
        reset_model_parallel()

    layout = ParallelLayout(tp=2, pp=2)
    init_distributed(layout)
    handle = build_megatron_model(model_dir, layout, load_weights=False, trainable=False)
    load_megatron_state(SimpleNamespace(handle=handle, optimizer=None), model_only_megatron_dir, load_optimizer=False)
    results["model_only_at_tp2pp2"] = {name: tensor.clone() for name, tensor in export_hf_weights(handle)}
    reset_model_parallel()
    return results if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def model_only(tiny_moe_dir, tmp_path_factory):
    from megarl.checkpoint.convert import HfToMcoreOptions, hf_to_mcore

    root = str(tmp_path_factory.mktemp("model_only"))
    return hf_to_mcore(tiny_moe_dir, root, HfToMcoreOptions(target_layout="tp=2,pp=2,ep=2"))


@pytest.fixture(scope="module")
def world(tiny_moe_dir, model_only, tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp("trained"))
    results = run_on_ranks(_world, 4, args=(tiny_moe_dir, work_dir, os.path.join(model_only, "megatron")), timeout=600)[0]
    return work_dir, results


def _read_hf(folder) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from megarl.checkpoint.convert_safetensors import hf_weight_files

    tensors = {}
    for name, path in hf_weight_files(folder).items():
        with safe_open(path, framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def _hf_logprobs(folder, sequences) -> list[torch.Tensor]:
    """log p(x_t | x_<t) for t >= 1 of each sequence, transformers' own forward (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            out.append(logp.gather(-1, ids[0, 1:, None])[:, 0])
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mcore_to_hf_equals_the_trained_model(world, layout, tmp_path, tiny_moe_dir):
    from megarl.checkpoint.convert import McoreToHfOptions, mcore_to_hf

    work_dir, results = world
    out = str(tmp_path / "hf")
    # A small shard size forces several shards + the index (the tiny model is ~0.66 MB).
    result = mcore_to_hf(os.path.join(work_dir, layout), out,
                         McoreToHfOptions(max_shard_size="100KB", verify=True, progress=False))
    assert result.verify_max_abs_diff == 0.0
    assert len(result.files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    for side_file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, side_file))

    converted = _read_hf(out)
    live = results[layout]["weights"]
    assert sorted(converted) == sorted(live)
    differing = [name for name in live if converted[name].dtype != torch.float32 or not torch.equal(converted[name], live[name])]
    assert differing == []  # bit-exact vs export_hf_weights of the trained model
    original = _read_hf(tiny_moe_dir)
    assert sorted(converted) == sorted(original)
    assert max((converted[n] - original[n]).abs().max().item() for n in original) > 1e-3  # the step moved the weights

    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(out)
    expert_names = [n for n in converted if ".mlp.experts." in n]
    expected = {f"model.layers.{l}.mlp.experts.{e}.{p}.weight" for l in range(hf_config.num_hidden_layers)
                for e in range(hf_config.num_experts) for p in ("gate_proj", "up_proj", "down_proj")}
    assert len(expert_names) == len(expected) and set(expert_names) == expected

    megatron = results[layout]["logprobs"]
    worst = 0.0
    for b, hf in enumerate(_hf_logprobs(out, _sequences())):
        worst = max(worst, (hf - megatron[b, 1: 1 + hf.numel()]).abs().max().item())
    print(f"{layout}: max |HF log-prob - Megatron log-prob| = {worst:.2e}")
    assert worst < 1e-5


def test_model_only_checkpoint_loads_at_another_layout(world, tiny_moe_dir):
    loaded = world[1]["model_only_at_tp2pp2"]
    original = _read_hf(tiny_moe_dir)
    assert sorted(loaded) == sorted(original)
    assert all(torch.equal(loaded[n], original[n]) for n in original)


def test_hf_to_mcore_to_hf_is_bit_exact(model_only, tiny_moe_dir, tmp_path):
    from megarl.checkpoint.convert import McoreToHfOptions, mcore_to_hf
    from megarl.checkpoint.store import read_trainer_state

    state = read_trainer_state(model_only)
    assert state["step"] == 0 and state["model_only"] is True
    # the checkpoint carries its HF config: no --hf-config needed
    out = str(tmp_path / "back")
    result = mcore_to_hf(os.path.dirname(model_only), out, McoreToHfOptions(verify=True, progress=False))
    assert result.files == ["model.safetensors"]
    with open(os.path.join(tiny_moe_dir, "model.safetensors"), "rb") as f:
        original_bytes = f.read()
    back, original = _read_hf(out), _read_hf(tiny_moe_dir)
    assert sorted(back) == sorted(original)
    assert all(back[n].dtype == original[n].dtype and torch.equal(back[n], original[n]) for n in original)
    assert result.bytes == sum(t.numel() * t.element_size() for t in original.values()) < len(original_bytes)


def test_bf16_output_is_the_rounded_checkpoint(model_only, tmp_path):
    import json

    from megarl.checkpoint.convert import McoreToHfOptions, mcore_to_hf

    out = str(tmp_path / "bf16")
    result = mcore_to_hf(model_only, out, McoreToHfOptions(dtype="bf16", verify=True, progress=False))
    assert 0.0 < result.verify_max_abs_diff < 2e-2  # bf16 rounding of weights of magnitude < ~2
    assert all(t.dtype == torch.bfloat16 for t in _read_hf(out).values())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
