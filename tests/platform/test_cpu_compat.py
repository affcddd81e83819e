"""The CPU shim: every patch is still needed by megatron-core 0.16.1, and with all of them a tiny
MoE GPT trains. One 2-rank gloo world runs every ablation (parallel state re-initialised per case):
the patch is reverted, a scenario runs and must fail with the failure the patch's docstring names,
then the patch is re-applied and the same scenario must succeed."""

from __future__ import annotations

import traceback

import pytest

from megarl.testing.distributed import run_on_ranks

# patch -> (layout, scenario, exception type, message fragment, megatron file on the failing stack)
ABLATIONS = {
    "device_literals": ({}, "train", "AssertionError", "Torch not compiled with CUDA enabled", "core/optimizer/optimizer.py"),
    "pin_memory": ({"cp": 2}, "train", "RuntimeError", "pin_memory=True requires", "embeddings/rope_utils.py"),
    "cuda_type_names": ({}, "train", "AssertionError", "", "core/optimizer/clip_grads.py"),
    "cuda_device_queries": ({}, "train", "AssertionError", "Torch not compiled with CUDA enabled", "distributed/param_and_grad_buffer.py"),
    "cpu_rng_tracker": ({}, "seed", "AssertionError", "Torch not compiled with CUDA enabled", "tensor_parallel/random.py"),
    "cuda_streams_events": ({}, "build_moe", "RuntimeError", "torch.cuda.Stream requires CUDA support", "moe/token_dispatcher.py"),
    "moe_te_general_gemm": ({}, "train", "NameError", "te_general_gemm", "moe/moe_utils.py"),
    "alltoall_split_sizes_numpy": ({"ep": 2}, "train", "TypeError", "all_to_all_single", "moe/token_dispatcher.py"),
    "uneven_gather_scatter": ({"tp": 2}, "uneven_collectives", "RuntimeError", "invalid tensor size", "tensor_parallel/mappings.py"),
    "distopt_load_only_saved_keys": ({}, "resume", "KeyError", "step", "optimizer/distrib_optimizer.py"),
    "distopt_step_per_param": ({}, "resume", "AssertionError", "", "optimizer/distrib_optimizer.py"),
}


def _scenario_train(layout, workdir):
    from tests.distributed import tiny_gpt

    return tiny_gpt.build_and_train(layout, steps=1)


def _scenario_seed(layout, workdir):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    return True


def _scenario_build_moe(layout, workdir):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from tests.distributed import tiny_gpt

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # megatron caches the side stream on the class
    tiny_gpt.build_tiny_gpt(tiny_gpt.tiny_config(layout))
    return True


def _scenario_uneven_collectives(layout, workdir):
    """megatron's AG/RS with per-rank sizes (what the alltoall dispatcher does over ETP>1 groups)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    group = mpu.get_tensor_model_parallel_group()
    rank, sizes = dist.get_rank(group), [3, 5]
    shard = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
    shard.requires_grad_(True)
    gathered = gather_from_sequence_parallel_region(shard, group=group, output_split_sizes=sizes)
    expected = torch.cat([torch.arange(n * 2, dtype=torch.float32).reshape(-1, 2) + 100 * r for r, n in enumerate(sizes)])
    assert torch.equal(gathered.detach(), expected)
    (gathered * (rank + 1)).sum().backward()  # backward = uneven reduce-scatter of the weights 1 + 2
    assert torch.equal(shard.grad, torch.full_like(shard, 3.0))
    full = torch.ones(sum(sizes), 2) * (rank + 1)
    scattered = reduce_scatter_to_sequence_parallel_region(full, group=group, input_split_sizes=sizes)
    assert torch.equal(scattered, torch.full((sizes[rank], 2), 3.0))
    return True


_resume_calls: list = []


def _scenario_resume(layout, workdir):
    """Distributed optimizer + torch Adam: save after 1 step, resume into a fresh model/optimizer;
    the next 2 losses must equal those of the uninterrupted run (exact Adam step counts)."""
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from tests.distributed import tiny_gpt

    tokens = tiny_gpt.random_tokens(4, 16)
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}

    def fresh():
        config = tiny_gpt.tiny_config(layout)
        chunks = tiny_gpt.build_tiny_gpt(config)
        tiny_gpt.deterministic_init(chunks)
        ddp, opt = tiny_gpt.make_trainer(config, chunks, optimizer="adam", lr=0.01, distributed_optimizer=True)
        return config, chunks, ddp, opt

    config, chunks, ddp, opt = fresh()
    tiny_gpt.train_losses(config, ddp, opt, tokens, steps=1)
    _resume_calls.append(None)  # every rank runs the same scenarios: same directory name
    path = os.path.join(workdir, f"ckpt_{len(_resume_calls)}")
    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()
    model_sd = chunks[0].sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, metadata=meta)}, path, sharded_strategy=("torch_dist", 1)
    )
    continued = tiny_gpt.train_losses(config, ddp, opt, tokens, steps=2)

    config, chunks, ddp, opt = fresh()
    model_sd = chunks[0].sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True, metadata=meta)}, path
    )
    chunks[0].load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    steps = [state["step"] for sub in getattr(opt, "chained_optimizers", [opt]) for state in sub.optimizer.state.values()]
    assert len({id(s) for s in steps}) == len(steps), "parameters share one Adam step tensor"
    assert all(float(s) == 1.0 for s in steps), sorted({float(s) for s in steps})
    resumed = tiny_gpt.train_losses(config, ddp, opt, tokens, steps=2)
    return continued, resumed


SCENARIOS = {
    "train": _scenario_train,
    "seed": _scenario_seed,
    "build_moe": _scenario_build_moe,
    "uneven_collectives": _scenario_uneven_collectives,
    "resume": _scenario_resume,
}


def _failure(exc: BaseException) -> dict:
    frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
    return {"type": type(exc).__name__, "message": str(exc), "frames": frames}


def _ablation_world(workdir, names):
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.platform import cpu_compat

    results = {}
    for name in names:
        layout_kwargs, scenario = ABLATIONS[name][:2]
        layout = ParallelLayout(**layout_kwargs)
        init_distributed(layout)
        cpu_compat.revert([name])
        try:
            SCENARIOS[scenario](layout, workdir)
            without = None
        except Exception as exc:  # the failure this patch prevents
            without = _failure(exc)
        cpu_compat.apply()
        assert name in cpu_compat.applied_patches()
        reset_model_parallel()
        init_distributed(layout)
        with_patch = SCENARIOS[scenario](layout, workdir)
        reset_model_parallel()
        results[name] = {"without": without, "with": with_patch}
    return results


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ablation"))
    return run_on_ranks(_ablation_world, world_size=2, args=(workdir, list(ABLATIONS)), timeout=600)


@pytest.mark.timeout(700)
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_patch_is_needed(ablations, name):
    _, _, exc_type, fragment, megatron_file = ABLATIONS[name]
    for rank, results in enumerate(ablations):
        failure = results[name]["without"]
        assert failure is not None, f"megatron-core no longer needs patch {name!r} (rank {rank})"
        if exc_type:
            assert failure["type"] == exc_type, failure
        assert fragment in failure["message"], failure
        assert any(megatron_file in f for f in failure["frames"]), (megatron_file, failure["frames"][-4:])
        assert results[name]["with"], name


@pytest.mark.timeout(700)
@pytest.mark.distributed
def test_resume_with_all_patches_is_exact(ablations):
    continued, resumed = ablations[0]["distopt_step_per_param"]["with"]
    assert continued == pytest.approx(resumed, abs=1e-6), (continued, resumed)


def test_patch_names_and_unknown_skip():
    from megarl.platform import cpu_compat

    assert set(cpu_compat.patch_names()) == set(ABLATIONS)
    with pytest.raises(ValueError, match="unknown cpu_compat patch.*known: "):
        cpu_compat.apply(skip=("no_such_patch",))
