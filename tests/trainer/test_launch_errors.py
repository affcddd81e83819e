"""Bad input stops launch/train.py with a message naming the problem, before Ray or a process group."""

import os

import pytest


def _write_dataset(path, drop_field=None):
    from megarl.data.records import write_records
    from megarl.data.synthetic import arith_records

    rows = arith_records(8, seed=0)
    if drop_field:
        for row in rows:
            row.pop(drop_field)
    write_records(rows, path)
    return path


@pytest.fixture(autouse=True)
def no_workers_may_start(monkeypatch):
    """Ray may already run in this test session (other tests share it): instead of asking whether
    it is initialised, make starting Ray or a worker group an error for these tests."""
    import megarl.trainer.worker_group as worker_group
    import megarl.utils.ray_runtime as ray_runtime

    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be rejected before Ray or any worker starts")

    monkeypatch.setattr(ray_runtime, "init_ray", refuse)
    monkeypatch.setenv("MEGARL_DEVICE", "auto")  # the cpu recipe's device plan sets it; restored after the test
    monkeypatch.setattr(worker_group.RayWorkerGroup, "__init__", refuse)


def _run(tiny_moe_dir, tmp_path, *extra):
    from launch.train import main

    return main(["--config", "configs/tiny_moe_grpo_cpu.yaml", f"--model.path={tiny_moe_dir}",
                 f"--trainer.output_dir={tmp_path / 'run'}", "--data.val_files=[]", "--trainer.test_freq=-1", *extra])


def test_a_dataset_missing_a_field_fails_before_any_worker_starts(tiny_moe_dir, tmp_path, capsys):
    import torch.distributed as dist

    bad = _write_dataset(str(tmp_path / "bad.parquet"), drop_field="reward_model")
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{bad}]") == 2
    err = capsys.readouterr().err
    assert "reward_model" in err and "bad.parquet" in err
    assert not dist.is_initialized()


def test_a_resume_path_that_is_not_a_checkpoint_fails_before_any_worker_starts(tiny_moe_dir, tmp_path, capsys):
    good = _write_dataset(str(tmp_path / "good.parquet"))
    os.makedirs(tmp_path / "half_written")
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{good}]", f"--trainer.resume={tmp_path / 'half_written'}") == 2
    assert "incomplete" in capsys.readouterr().err


@pytest.mark.parametrize("override, field", [
    ("--trainer.totl_steps=3", "trainer.totl_steps"),
    ("--rollout.n=four", "rollout.n"),
    ("--model.path=", "model.path"),
    ("--algorithm.adv_estimator=grpoo", "algorithm.adv_estimator"),
])
def test_bad_config_values_name_the_field(tiny_moe_dir, tmp_path, capsys, override, field):
    good = _write_dataset(str(tmp_path / "good.parquet"))
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{good}]", override) == 2
    assert field in capsys.readouterr().err


def test_ppo_cannot_resume_a_checkpoint_without_critic(tiny_moe_dir, tmp_path, capsys):
    import json

    from megarl.checkpoint.store import COMPLETE_MARKER, MEGATRON_SUBDIR, TRAINER_STATE_FILE

    good = _write_dataset(str(tmp_path / "good.parquet"))
    step = tmp_path / "grpo_step"  # a complete checkpoint of a run without a critic
    os.makedirs(step / MEGATRON_SUBDIR)
    (step / MEGATRON_SUBDIR / "metadata.json").write_text("{}")
    (step / MEGATRON_SUBDIR / ".metadata").write_bytes(b"dcp")
    (step / TRAINER_STATE_FILE).write_text(json.dumps({"step": 3}))
    (step / COMPLETE_MARKER).write_text("")
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{good}]", "--algorithm.name=ppo",
                "--algorithm.adv_estimator=gae", f"--trainer.resume={step}") == 2
    assert f"checkpoint {step} has no critic state (critic/)" in capsys.readouterr().err


def _checkpoint_root(run_dir, steps):
    """A run's checkpoint folder with complete, manifest-bearing checkpoints (placeholder megatron files)."""
    from megarl.checkpoint.store import CheckpointStore

    store = CheckpointStore(str(run_dir / "checkpoints"))
    paths = []
    for step in steps:
        pending = store.begin(step)
        for name in ("metadata.json", ".metadata", "__0_0.distcp"):
            with open(os.path.join(pending.megatron_dir, name), "w") as f:
                f.write("{}")
        paths.append(store.commit(pending, {"loader": {}}))
    return paths


def test_a_damaged_resume_path_fails_naming_the_file_before_any_worker_starts(tiny_moe_dir, tmp_path, capsys):
    import torch.distributed as dist

    good = _write_dataset(str(tmp_path / "good.parquet"))
    (step,) = _checkpoint_root(tmp_path / "old_run", [2])
    os.remove(os.path.join(step, "megatron", ".metadata"))
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{good}]", f"--trainer.resume={step}") == 2
    assert f"checkpoint {step} is damaged:\n  - megatron/.metadata: missing" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_auto_with_only_damaged_checkpoints_fails_before_any_worker_starts(tiny_moe_dir, tmp_path, capsys):
    good = _write_dataset(str(tmp_path / "good.parquet"))
    (step,) = _checkpoint_root(tmp_path / "run", [2])  # the output_dir _run uses
    os.truncate(os.path.join(step, "megatron", "__0_0.distcp"), 1)
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{good}]", "--trainer.resume=auto") == 2
    err = capsys.readouterr().err
    assert "megatron/__0_0.distcp: 1 bytes, the manifest says 2 (truncated or partly copied)" in err
    assert "no checkpoint under" in err and "trainer.resume=disable to start afresh" in err
    assert os.path.isdir(step)


def test_an_empty_prompt_fails_with_its_row_before_any_worker_starts(tiny_moe_dir, tmp_path, capsys):
    from megarl.data.records import write_records
    from megarl.data.synthetic import arith_records

    rows = arith_records(8, seed=0)
    rows[5]["prompt"] = [{"role": "user", "content": ""}]
    path = str(tmp_path / "empty.parquet")
    write_records(rows, path)
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{path}]") == 2
    assert f"{path} row 5: field 'prompt' is an empty prompt" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("--actor.param_offload=true", "actor.param_offload: the trainer does not move actor state to host memory"),
    ("--trainer.device=cuda", "trainer.device: cuda requested but torch sees no CUDA device"),
    ("--rollout.weight_sync.transport=cuda_ipc", "rollout.weight_sync.transport: cuda_ipc needs CUDA"),
])
def test_switches_a_run_cannot_honour_here_stop_it_before_any_worker_starts(tiny_moe_dir, tmp_path, capsys,
                                                                           override, message):
    good = _write_dataset(str(tmp_path / "good.parquet"))
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{good}]", override) == 2
    assert message in capsys.readouterr().err


def test_a_dry_run_plans_the_offload_switches(tmp_path, capsys):
    """The 235B recipe turns the offload switches on: its --dry-run still plans (they are counted)."""
    import json

    from launch.train import main
    from tests.planner.hf_configs import QWEN3_235B_A22B

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_235B_A22B))
    assert main(["--config", "configs/qwen3_235b_a22b_grpo.yaml", f"--model.path={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# dry-run plan" in out and "host memory per node for offloaded state" in out


def test_a_batch_larger_than_the_dataset_is_a_config_error_naming_both_numbers(tiny_moe_dir, tmp_path, capsys):
    good = _write_dataset(str(tmp_path / "good.parquet"))  # 8 prompts; the recipe asks 16 per step
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{good}]") == 2
    err = capsys.readouterr().err
    assert "data.train_batch_size=16 is larger than the training set: 8 prompts" in err
    assert "drop_last" not in err and "Traceback" not in err


def test_dropped_overlong_prompts_are_counted_in_the_batch_error(tiny_moe_dir, tmp_path, capsys):
    from megarl.data.records import write_records
    from megarl.data.synthetic import arith_records

    rows = arith_records(20, seed=0)
    for row in rows[:14]:  # 14 of 20 prompts far over the limit, 6 left < 8 per step
        row["prompt"][0]["content"] += " please" * 40
    path = str(tmp_path / "long.parquet")
    write_records(rows, path)
    assert _run(tiny_moe_dir, tmp_path, f"--data.train_files=[{path}]", "--data.train_batch_size=8",
                "--actor.ppo_mini_batch_size=8") == 2
    err = capsys.readouterr().err
    assert "dropped 14 of 20 prompts longer than max_prompt_length=64" in err  # the start-up warning
    assert "data.train_batch_size=8 is larger than the training set: 6 prompts" in err
    assert "(14 more dropped as longer than data.max_prompt_length=64)" in err
