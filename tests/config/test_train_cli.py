"""launch/train.py: bad configs exit 2 naming the field before anything starts; --dry-run plans."""

import os
import subprocess
import sys
import types

import pytest

from launch.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_RECIPE = os.path.join(ROOT, "configs", "tiny_moe_grpo_cpu.yaml")


@pytest.fixture
def trainer_spy(monkeypatch):
    """Stands in for megarl.trainer (the lead's loop) to see whether and with what it is called."""
    calls = []
    monkeypatch.setitem(sys.modules, "megarl.trainer", types.SimpleNamespace(run=calls.append))
    return calls


def _run_main(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("override,message", [
    ("--rollout.temprature=0.7", "rollout.temprature: unknown key; did you mean 'temperature'?"),
    ("--parallel.tp=two", "parallel.tp: expected an integer, got 'two'"),
    ("--model.path=null", "model.path: required; set it to a HuggingFace model folder"),
    ("--rollout.placement=remote", "rollout.placement: 'remote' is not one of 'colocated', 'disaggregated'"),
])
def test_bad_config_exits_before_the_trainer(capsys, trainer_spy, tiny_moe_dir, override, message):
    rc, out, err = _run_main(capsys, ["--config", TINY_RECIPE, f"--model.path={tiny_moe_dir}", override])
    assert rc == 2 and trainer_spy == [] and out == ""
    assert message in err


def test_valid_config_is_printed_then_handed_to_the_trainer(capsys, trainer_spy, tiny_moe_dir, tmp_path):
    train = tmp_path / "train.parquet"
    train.write_bytes(b"")
    rc, out, _ = _run_main(capsys, ["--config", TINY_RECIPE, f"--model.path={tiny_moe_dir}",
                                    f"--data.train_files=[{train}]", "--data.val_files=[]", "--trainer.test_freq=-1",
                                    "--rollout.n", "8", "--ep", "1"])
    assert rc == 0
    (cfg,) = trainer_spy
    assert (cfg.rollout.n, cfg.parallel.ep, cfg.model.path) == (8, 1, tiny_moe_dir)
    assert out.startswith("# resolved config")
    assert "  n: 8\n" in out and f"  path: {tiny_moe_dir}\n" in out


def test_missing_data_files_stop_a_real_run_but_not_a_dry_run(capsys, trainer_spy, tiny_moe_dir, tmp_path):
    # a path that exists nowhere (the recipe's own data path does exist once `make demo` has run)
    missing = str(tmp_path / "absent" / "train.parquet")
    args = ["--config", TINY_RECIPE, f"--model.path={tiny_moe_dir}", f"--data.train_files=[{missing}]"]
    rc, _, err = _run_main(capsys, args)
    assert rc == 2 and f"data.train_files[0]: '{missing}' does not exist" in err
    rc, out, _ = _run_main(capsys, [*args, "--dry-run"])
    assert rc == 0 and trainer_spy == []
    assert "experts per EP rank: 2; attention heads per TP rank: 4; KV heads per TP rank: 2" in out
    assert "training layout: TP 1 x PP 1 x CP 1 x DP 2; experts: EP 2 x ETP 1 x expert-DP 1" in out
    assert out.rstrip().endswith("plan: OK")


def test_bad_layout_exits_2_with_or_without_dry_run(capsys, trainer_spy, tiny_moe_dir, tmp_path):
    bad_layout = ["--config", TINY_RECIPE, f"--model.path={tiny_moe_dir}", "--ep", "3", "--gpus-per-node", "3"]
    rc, out, _ = _run_main(capsys, [*bad_layout, "--dry-run"])
    assert rc == 2
    assert "ERROR parallel: 4 experts are not divisible by EP=3" in out
    train = tmp_path / "train.parquet"
    train.write_bytes(b"")
    rc, _, err = _run_main(capsys, [*bad_layout, f"--data.train_files=[{train}]", "--data.val_files=[]",
                                    "--trainer.test_freq=-1"])
    assert rc == 2 and trainer_spy == []
    assert "error: the parallel layout does not fit the model or the cluster:\n  - parallel: 4 experts" in err


def test_script_runs_standalone_without_the_trainer_or_a_process_group(tiny_moe_dir):
    """As users run it: a fresh interpreter; --dry-run must not need megarl.trainer or torch.distributed."""
    code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    import torch.distributed as dist\n"
            "    print('RC', e.code, 'trainer' , 'megarl.trainer' in sys.modules, 'pg', dist.is_initialized())\n")
    result = subprocess.run(
        [sys.executable, "-c", code, os.path.join(ROOT, "launch", "train.py"), "--config", TINY_RECIPE,
         f"--model.path={tiny_moe_dir}", "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.stdout.rstrip().endswith("RC 0 trainer False pg False"), result.stdout[-2000:] + result.stderr
