"""megarl.platform.device_plan: the one device decision (trainer.device auto | cpu | cuda), what it
decides for a run on this (CUDA-less) machine, and that the trainer prints it once."""

import os

import pytest

from megarl.config import ConfigError
from megarl.platform import device as device_mod
from megarl.platform.device import device_plan


@pytest.fixture(autouse=True)
def fresh_device_env(monkeypatch):
    """A plan for trainer.device=cpu sets MEGARL_DEVICE for the processes the run starts: monkeypatch
    restores the variable (unset) after the test."""
    monkeypatch.setenv(device_mod.DEVICE_ENV, "auto")
    monkeypatch.setattr(device_mod, "_ANNOUNCED", set())
    yield
    device_mod._process_plan.cache_clear()


def _decision(plan, name):
    return next(d for d in plan.decisions if d.name == name)


@pytest.mark.parametrize("requested", ["auto", "cpu"])
def test_plan_on_a_machine_without_cuda(requested):
    plan = device_plan(requested, placement="colocated", transport="auto", train_ranks=2)
    assert not plan.accelerator and plan.requested == requested
    assert (plan.backend, plan.layer_spec, plan.cpu_shim, plan.pin_memory) == ("gloo", "local", True, False)
    assert (plan.cpus_per_rank, plan.gpus_per_rank, plan.engine_cpus) == (0.5, 0, 0.5)
    # the recipe's colocated placement runs disaggregated on CPU: decided here, with its reason
    assert plan.placement == "disaggregated"
    assert "colocated asked" in _decision(plan, "rollout.placement").reason
    assert (plan.weight_transport, plan.enable_sleep_mode, plan.enforce_eager) == ("object_store", False, True)
    assert plan.threads_per_rank == max(1, (os.cpu_count() or 1) // 2) == plan.torch_threads(2)
    assert {d.name for d in plan.decisions} == {"pin_memory", "threads_per_rank", "rollout.placement",
                                                "rollout.weight_sync.transport", "vllm.enable_sleep_mode",
                                                "vllm.enforce_eager"}


def test_cpu_request_is_handed_to_the_processes_the_run_starts():
    assert device_plan("auto").requested == "auto" and os.environ[device_mod.DEVICE_ENV] == "auto"
    device_plan("cpu")
    assert os.environ[device_mod.DEVICE_ENV] == "cpu"
    assert device_plan().requested == "cpu"  # a worker's plan: the driver's decision
    from megarl.utils.ray_runtime import forwarded_env

    assert forwarded_env()[device_mod.DEVICE_ENV] == "cpu"  # Ray actors see it too


def test_cpu_forces_the_cpu_path_even_where_cuda_exists(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the plan asks
    gpu = device_plan("auto", placement="colocated", transport="auto")
    assert gpu.accelerator and gpu.backend == "nccl" and gpu.placement == "colocated"
    assert (gpu.weight_transport, gpu.enable_sleep_mode, gpu.pin_memory) == ("cuda_ipc", True, True)
    cpu = device_plan("cpu", placement="colocated", transport="auto")
    assert not cpu.accelerator and cpu.backend == "gloo" and cpu.cpu_shim and cpu.placement == "disaggregated"


def test_cuda_requested_without_cuda_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError) as err:
        device_plan("cuda")
    assert err.value.errors[0].startswith("trainer.device: cuda requested but torch sees no CUDA device")


@pytest.mark.parametrize("transport", ["cuda_ipc", "nccl"])
def test_cuda_transports_on_cpu_are_a_config_error(transport):
    with pytest.raises(ConfigError) as err:
        device_plan("auto", placement="disaggregated", transport=transport)
    assert err.value.errors == [f"rollout.weight_sync.transport: {transport} needs CUDA and this run is on CPU; "
                                "use auto or object_store"]


def test_the_plan_is_printed_once(capsys):
    from megarl.config import load_config
    from megarl.trainer import components

    cfg = load_config(None, {"model.path": "/m", "data.train_files": ["t.parquet"], "trainer.gpus_per_node": 2},
                      check_paths=False)
    first = components.device_plan(cfg)
    again = components.device_plan(cfg)
    out = capsys.readouterr().out
    assert first == again
    assert out.count("device plan: cpu (trainer.device=auto: no CUDA device is visible)") == 1
    assert "rollout.placement = disaggregated: colocated asked" in out
    assert out == first.describe() + "\n"
    sft = load_config(None, {"model.path": "/m", "data.train_files": ["t.parquet"], "trainer.type": "sft"},
                      check_paths=False)
    assert components.device_plan(sft, announce=False).placement is None  # no rollout: no rollout decisions


def test_device_questions_outside_the_platform_go_through_the_plan():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["grep", "-rn", "torch.cuda.is_available", "megarl", "launch"], cwd=root,
                         capture_output=True, text=True).stdout
    assert [line for line in out.splitlines() if not line.startswith("megarl/platform/")] == []
