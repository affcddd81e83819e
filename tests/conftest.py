"""Shared, session-scoped fixtures: tiny models are written once per test run."""

import os

import pytest

# Tests never reach a model hub; keep every cache inside the work tree (the Makefile sets these too,
# this covers a bare `pytest` run).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"qwen3_moe": dir, "qwen3": dir, "qwen2": dir}: random fp32 HF checkpoints, shared tokenizer."""
    from megarl.utils.tiny_models import write_tiny_model_set

    return write_tiny_model_set(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.fixture(scope="session")
def tiny_moe_dir(tiny_models):
    return tiny_models["qwen3_moe"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per test session, shared by every test that needs actors."""
    import ray

    from megarl.utils.ray_runtime import init_ray

    init_ray()
    yield ray
