"""Rollout fixtures: ONE vLLM engine (a Ray actor) shared by the rollout tests of a session.

Tests that push weights restore the checkpoint's weights before they return, so every test may
assume the engine holds the tiny model's checkpoint weights.
"""

import os

import pytest

SHARED_ENGINE_NAME = "megarl-test-rollout"  # named actor: gloo ranks find it with engine_handles()


@pytest.fixture(scope="session")
def ray_cluster():
    os.makedirs(os.environ.setdefault("TMPDIR", os.path.join(os.getcwd(), ".runtime", "tmp")), exist_ok=True)
    import ray

    from megarl.rollout import init_ray

    init_ray()  # the project's one Ray start-up, shared with the trainer tests (logical CPUs >= 4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def rollout_group(ray_cluster, tiny_moe_dir):
    from megarl.rollout import EngineGroup, EngineGroupOptions, VLLMEngineConfig

    group = EngineGroup(
        VLLMEngineConfig.for_cpu_tests(tiny_moe_dir),
        EngineGroupOptions(num_engines=1, engine_cpus=0.5, generate_timeout_s=300, start_timeout_s=600, name=SHARED_ENGINE_NAME),
    )
    yield group
    group.shutdown()


@pytest.fixture(scope="session")
def hf_model(tiny_moe_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_moe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_moe_dir)
