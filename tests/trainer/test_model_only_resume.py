"""The resume rule every trainer shares (`megarl/trainer/skeleton.py`), on real workers: a model-only
checkpoint (`megarl-convert hf-to-mcore`) is weights only — its weights on every rank, a fresh
optimizer, a fresh data stream and step 0, whatever step or data state its trainer_state.json names.
RL, SFT and DPO are each started from the same model-only checkpoint; a trainer that drifted from the
rule (kept the step, loaded the data position, kept model.path's weights) fails here."""

import json
import os
import subprocess
import sys

import pytest

from megarl.data.records import write_records

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]  # real ranks: 1-3 min each

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKPOINT_STEP = 3


@pytest.fixture(scope="module")
def model_only(tiny_moe_dir, tmp_path_factory):
    """(hf folder B, model-only checkpoint of B at step 3 whose state also names a data position).
    B has tiny_moe_dir's architecture and tokenizer and other weights, so a run with
    model.path=tiny_moe_dir that resumes from the checkpoint must hold B's weights."""
    from transformers import AutoTokenizer

    from megarl.checkpoint.store import TRAINER_STATE_FILE
    from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model

    root = tmp_path_factory.mktemp("model_only_resume")
    other = write_tiny_model(str(root / "other_hf"), TinyModelSpec(seed=1), AutoTokenizer.from_pretrained(tiny_moe_dir))
    # a separate process: the conversion sets up (and tears down) a one-rank torch.distributed world
    code = ("import sys; from megarl.checkpoint.convert import HfToMcoreOptions, hf_to_mcore; "
            f"print(hf_to_mcore(sys.argv[1], sys.argv[2], HfToMcoreOptions(step={CHECKPOINT_STEP})))")
    out = subprocess.run([sys.executable, "-c", code, other, str(root / "checkpoints")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    step_dir = out.stdout.strip().splitlines()[-1]
    state_file = os.path.join(step_dir, TRAINER_STATE_FILE)
    with open(state_file) as f:
        state = json.load(f)
    assert state["model_only"] is True and state["step"] == CHECKPOINT_STEP
    # data positions no trainer could load: a trainer that reads them for a model-only resume fails
    state.update(loader={"position": "not a loader state"}, data={"position": "not a stream state"})
    with open(state_file, "w") as f:
        json.dump(state, f)
    # the edit is deliberate: re-seal the checkpoint's manifest as its writer would, so it verifies
    from megarl.checkpoint.manifest import MANIFEST_FILE, build_manifest

    with open(os.path.join(step_dir, MANIFEST_FILE), "w") as f:
        json.dump(build_manifest(step_dir, CHECKPOINT_STEP), f)
    return other, step_dir


def _hf_weights(hf_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(hf_dir, "model.safetensors"))


def _assert_weights_are(exported, hf_dir):
    expected = _hf_weights(hf_dir)
    assert exported.keys() == expected.keys()
    worst = max((exported[k] - expected[k]).abs().max().item() for k in expected)
    assert worst == 0.0, f"max |weight - checkpoint weight| = {worst:.3e}"


def _fresh(stream):
    from megarl.trainer.sample_stream import SampleStream

    return SampleStream(stream.num_samples, stream.batch_size, seed=stream.seed, shuffle=stream.shuffle,
                        num_epochs=stream.num_epochs, max_count=stream.max_count,
                        min_batch_size=stream.min_batch_size).state_dict()


def _sft_config(model_dir, out_dir, train, **overrides):
    from megarl.config import load_config

    return load_config(None, {
        "trainer.type": "sft", "model.path": model_dir, "model.dtype": "fp32", "data.train_files": [train],
        "data.train_batch_size": 8, "sft.max_length": 64, "actor.use_dynamic_bsz": True,
        "actor.max_token_len_per_gpu": 256, "optimizer.lr": 3e-3, "optimizer.weight_decay": 0.0,
        "trainer.output_dir": out_dir, "trainer.logger": ["tensorboard"], "trainer.gpus_per_node": 1,
        "trainer.device": "cpu", "trainer.resume": "disable", "trainer.total_steps": 2,
        "trainer.save_freq": 0, "trainer.test_freq": -1, **overrides,
    }, check_paths=False)


def test_sft_model_only_resume_is_a_fresh_run_from_the_checkpoint_weights(tiny_moe_dir, model_only, tmp_path):
    from megarl.data.synthetic import sft_arith_records
    from megarl.trainer.sft_trainer import SFTTrainer

    other, step_dir = model_only
    train = str(tmp_path / "sft.jsonl")
    write_records(sft_arith_records(32, seed=0), train)
    runs = {}
    for name, model_dir, resume in [("resumed", tiny_moe_dir, step_dir), ("straight", other, "disable")]:
        trainer = SFTTrainer(_sft_config(model_dir, str(tmp_path / name), train, **{"trainer.resume": resume}))
        trainer.trained_batches = []
        try:
            if name == "resumed":
                assert trainer.step == 0
                assert trainer.stream.state_dict() == _fresh(trainer.stream)
                _assert_weights_are(trainer.workers.rank0.export_weights(), other)
            runs[name] = (trainer.fit(), trainer.trained_batches)
        finally:
            trainer.close()
    (resumed, resumed_batches), (straight, straight_batches) = runs["resumed"], runs["straight"]
    # the same samples, and with a fresh optimizer the very same losses as a run started from B
    assert resumed_batches == straight_batches and len(resumed) == 2
    for a, b in zip(resumed, straight):
        print(f"loss resumed {a['train/loss']:.10f} straight from B {b['train/loss']:.10f}")
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
        assert a["train/lr"] == b["train/lr"]  # the LR schedule starts at step 0 too


def test_dpo_model_only_resume_starts_at_step_0_with_the_checkpoint_weights(tiny_moe_dir, model_only, tmp_path):
    from megarl.config import load_config
    from megarl.data.synthetic import preference_arith_records
    from megarl.trainer.dpo_trainer import DPOTrainer

    other, step_dir = model_only
    train = str(tmp_path / "pairs.jsonl")
    write_records(preference_arith_records(16, seed=0, rejected="plain"), train)
    cfg = load_config(None, {
        "trainer.type": "dpo", "model.path": tiny_moe_dir, "model.dtype": "fp32", "data.train_files": [train],
        "data.train_batch_size": 8, "dpo.max_length": 64, "trainer.output_dir": str(tmp_path / "dpo"),
        "trainer.logger": ["tensorboard"], "trainer.gpus_per_node": 1, "trainer.device": "cpu",
        "trainer.resume": step_dir, "trainer.total_steps": 1, "trainer.save_freq": 0, "trainer.test_freq": -1,
    }, check_paths=False)
    trainer = DPOTrainer(cfg)
    try:
        assert trainer.step == 0
        assert trainer.stream.state_dict() == _fresh(trainer.stream)
        _assert_weights_are(trainer.workers.rank0.export_weights(), other)
    finally:
        trainer.close()


@pytest.mark.vllm
def test_rl_model_only_resume_starts_at_step_0_with_the_checkpoint_weights(tiny_moe_dir, model_only, tmp_path):
    from megarl.config import load_config
    from megarl.data.synthetic import arith_records
    from megarl.trainer import components
    from megarl.trainer.rl_trainer import RLTrainer

    other, step_dir = model_only
    train = str(tmp_path / "train.parquet")
    write_records(arith_records(32, seed=0), train)
    cfg = load_config(os.path.join(REPO, "configs", "tiny_moe_grpo_cpu.yaml"), {
        "model.path": tiny_moe_dir, "data.train_files": [train], "data.val_files": [], "data.train_batch_size": 4,
        "actor.ppo_mini_batch_size": 2, "parallel.ep": 1, "trainer.gpus_per_node": 1,
        "trainer.output_dir": str(tmp_path / "rl"), "trainer.logger": ["tensorboard"], "trainer.resume": step_dir,
        "trainer.total_steps": 1, "trainer.save_freq": 0, "trainer.test_freq": -1,
    }, check_paths=False)
    trainer = RLTrainer(cfg)
    try:
        assert trainer.step == 0
        fresh = components.train_loader(cfg, trainer.loader.dataset)
        assert trainer.loader.state_dict() == fresh.state_dict()
        _assert_weights_are(trainer.workers.rank0.export_weights(), other)
    finally:
        trainer.close()
