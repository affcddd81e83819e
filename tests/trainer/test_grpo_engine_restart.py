"""A GRPO run (launch/train.py in its own process: Megatron ranks as Ray actors, a vLLM CPU engine)
with rollout.on_engine_failure=restart survives SIGKILL of its engine's process during generate and
during a weight push, and every step equals a run without the kills. The engine process is found by
the title Ray gives a worker while it runs a task (`ray::VLLMEngine.<method>`), so each kill lands
inside that call.

Why equal, not just close: the trainer seeds every request (run seed, step, prompt), so the retried
requests sample on the fresh engine exactly what they would have on the old one, and the restarted
engine holds the trainer's current weights (re-pushed before the retry; the interrupted push redone)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1800)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def task(tiny_moe_dir, tmp_path_factory):
    from megarl.data.records import write_records
    from megarl.data.synthetic import arith_records

    root = tmp_path_factory.mktemp("restart_task")
    write_records(arith_records(64, seed=0), str(root / "train.parquet"))
    return tiny_moe_dir, str(root / "train.parquet")


def _launch(task, out_dir, *extra):
    model, train = task
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config", os.path.join(REPO, "configs", "tiny_moe_grpo_cpu.yaml"),
           f"--model.path={model}", f"--data.train_files=[{train}]", "--data.val_files=[]",
           f"--trainer.output_dir={out_dir}", "--trainer.total_steps=5", "--trainer.save_freq=0",
           "--trainer.test_freq=-1", "--data.train_batch_size=4", "--actor.ppo_mini_batch_size=2",
           "--rollout.max_new_tokens=16", *extra]
    log = open(out_dir + ".log", "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _session_processes(sid: int) -> dict[int, str]:
    """pid -> process title of every process in session `sid` (the launched run and all it started)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:  # fields after "(comm)": state ppid pgrp session ...
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    return out


def _steps_logged(out_dir) -> int:
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


class EngineKiller(threading.Thread):
    """SIGKILLs the run's engine while it executes one of `methods`, once `after_steps` steps are
    logged — for each (after_steps, methods) in `plan`, in order. Watches the engine process's title
    alone in a tight loop (a push of the tiny model is three short engine calls). Records its kills."""

    def __init__(self, proc, out_dir, plan):
        super().__init__(daemon=True)
        self.proc, self.out_dir, self.plan, self.killed, self.stop = proc, out_dir, list(plan), [], False

    def _engine_pid(self):
        engines = [pid for pid, title in _session_processes(self.proc.pid).items() if title.startswith("ray::VLLMEngine")]
        return engines[0] if engines else None

    def run(self):
        for after_steps, methods in self.plan:
            titles = tuple(f"ray::VLLMEngine.{m}" for m in methods)
            pid = None
            while not self.stop and self.proc.poll() is None:
                if _steps_logged(self.out_dir) < after_steps:
                    time.sleep(0.05)
                    continue
                pid = pid or self._engine_pid()
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().split(b"\0")[0].decode(errors="replace")
                except (OSError, TypeError):
                    pid = None  # not started yet, or restarted: look it up again
                    time.sleep(0.05)
                    continue
                if title.startswith(titles):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((title.split(".", 1)[1].split("(")[0].strip(), _steps_logged(self.out_dir)))
                    break
                time.sleep(0.0002)


def _wait(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f)}


def test_grpo_survives_engine_kills_in_generate_and_in_push(task, tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert _wait(_launch(task, straight), 900) == 0, open(straight + ".log").read()[-4000:]

    proc = _launch(task, killed, "--rollout.on_engine_failure=restart", "--rollout.max_engine_restarts=2")
    push_calls = ("begin_weight_update", "load_weight_bucket", "finish_weight_update")
    killer = EngineKiller(proc, killed, [(1, ("generate_tagged",)), (3, push_calls)])
    killer.start()
    code = _wait(proc, 1200)
    killer.stop = True
    log = open(killed + ".log").read()
    assert code == 0, log[-4000:]
    assert [s for _, s in killer.killed] == [1, 3] and killer.killed[0][0] == "generate_tagged", killer.killed
    assert killer.killed[1][0] in push_calls, killer.killed
    assert "rollout engine 0 died during generate" in log and "restart 1 of at most 2" in log
    assert "rollout engine 0 died during a weight push" in log and "restart 2 of at most 2" in log

    a, b = _metrics(straight), _metrics(killed)
    assert sorted(b) == sorted(a) == [1, 2, 3, 4, 5]
    clock = ("timing_s/", "perf/", "weight_push/seconds", "weight_push/gb_per_s")  # wall-clock numbers
    for step in a:
        assert sorted(b[step]) == sorted(a[step])
        differ = {k: (a[step][k], b[step][k]) for k in a[step] if not k.startswith(clock) and a[step][k] != b[step][k]}
        assert not differ, (step, differ)
        assert b[step]["rollout/logprob_abs_diff_mean"] < 1e-5  # trainer and engine hold the same weights
