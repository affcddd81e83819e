"""Weight push with one sender per pipeline stage, through `MegatronTrainWorker` (gloo world 4 and
the session's vLLM engine), at PP2×EP2 and TP2×PP2 in ONE world:

after one optimizer step, `push_weights` (verify="logprobs") ships each stage from its own sender:
- no rank receives more than its own stage's bytes × 1.05 (counted by the exporter);
- the engine received each HF tensor exactly once (counted by the engine: total == distinct ==
  the checkpoint's tensor count);
- the engine's log-probs of the probe equal Megatron's within 1e-5 (the pusher's logprobs check,
  and the test's own comparison on other sequences);
- a push through the per-tensor path (today's: rank 0 sends everything) gives the same engine
  weights (checksum) — and rank 0 received far more than its stage there.

The checkpoint's weights are pushed back at the end (the shared engine's contract).
"""

import io

import pytest
import torch

from megarl.testing.distributed import run_on_ranks
from tests.rollout.conftest import SHARED_ENGINE_NAME
from tests.rollout.reference import checkpoint_state_dict

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1500)]

LAYOUTS = [("pp2ep2", {"parallel.pp": 2, "parallel.ep": 2}),
           ("tp2pp2", {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True})]
CHECK = [[7, 19, 240, 3, 88, 410, 52, 6, 131], [300, 12, 44, 9, 77]]
LOGPROB_TOLERANCE = 1e-5


def _config(model_dir, overrides):
    from megarl.config import load_config

    return load_config(None, {
        "model.path": model_dir, "model.dtype": "fp32", "data.train_files": ["unused.parquet"],
        "optimizer.lr": 2e-2, "optimizer.weight_decay": 0.0, "optimizer.lr_warmup_steps": 0,
        "actor.ppo_mini_batch_size": 2, "actor.micro_batch_size": 2, "data.train_batch_size": 4,
        "rollout.n": 2, "rollout.max_new_tokens": 8, "trainer.nnodes": 1, "trainer.gpus_per_node": 4,
        **overrides,
    }, check_paths=False)


def step_and_push(model_dir: str, gcs_address: str) -> bytes:
    import ray

    from megarl.algorithms import compute_loss_normalisers, policy_loss_fn
    from megarl.distributed.init import reset_model_parallel
    from megarl.models.batch import SequenceBatch
    from megarl.rollout import engine_handles, init_ray
    from megarl.trainer.train_worker import MegatronTrainWorker
    from megarl.rollout.weight_sync import WeightPushOptions

    init_ray(address=gcs_address)
    engines = engine_handles(SHARED_ENGINE_NAME, 1)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (12, 9, 15, 7)]
    batch = SequenceBatch.from_sequences(
        seqs, loss_mask=[[0.0] * 2 + [1.0] * (len(s) - 2) for s in seqs],
        advantages=[[1.0 if i % 2 else -1.0] * len(s) for i, s in enumerate(seqs)],
        old_logprobs=[[0.0] * len(s) for s in seqs], rollout_logprobs=[[0.0] * len(s) for s in seqs])
    results = {}
    for name, overrides in LAYOUTS:
        worker = MegatronTrainWorker(_config(model_dir, overrides), total_optimizer_steps=2)
        rank = torch.distributed.get_rank()
        loss_fn = policy_loss_fn(worker.loss_options, compute_loss_normalisers(batch.fields["loss_mask"]))
        worker.actor.train_step(batch, loss_fn)
        megatron, _ = worker.actor.forward_logprobs(SequenceBatch.from_sequences(CHECK))
        worker.attach_rollout(engines, WeightPushOptions("object_store", 0.05, verify="logprobs"))
        assert worker.push_by_stage
        staged = worker.push_weights()
        vllm_staged = ray.get(engines[0].score.remote(CHECK)) if rank == 0 else None
        checksum_staged = ray.get(engines[0].weights_checksum.remote()) if rank == 0 else None
        # today's path: only rank 0 holds engines (as under torchrun), the per-tensor exporter
        worker.attach_rollout(engines if rank == 0 else None, WeightPushOptions("object_store", 0.05, verify="checksum"))
        assert not worker.push_by_stage
        legacy = worker.push_weights()
        if rank == 0:
            results[name] = {"staged": staged, "legacy": legacy, "megatron": megatron, "vllm": vllm_staged,
                             "checksum_staged": checksum_staged,
                             "checksum_legacy": ray.get(engines[0].weights_checksum.remote())}
        del worker
        reset_model_parallel()
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


def test_one_sender_per_stage_pushes_each_tensor_once_and_logprobs_match(rollout_group, tiny_moe_dir):
    import ray

    from megarl.rollout.weight_sync import WeightPushOptions

    checksum_before = rollout_group.weights_checksums()
    gcs_address = ray.get_runtime_context().gcs_address
    try:
        per_rank = run_on_ranks(step_and_push, world_size=4, args=(tiny_moe_dir, gcs_address), timeout=1300)
        results = torch.load(io.BytesIO(per_rank[0]), weights_only=False)
        count = len(checkpoint_state_dict(tiny_moe_dir))
        for name, _ in LAYOUTS:
            r = results[name]
            staged, legacy = r["staged"], r["legacy"]
            print(f"{name}: staged {staged}\n{name}: legacy {legacy}")
            assert staged["weight_push/senders"] == 2
            assert staged["weight_push/max_received_over_stage_bytes"] <= 1.05
            assert staged["weight_push/tensors"] == count
            assert staged["weight_push/engine_tensors_received_min"] == staged["weight_push/engine_tensors_received_max"] == count
            assert staged["weight_push/logprob_max_diff"] <= LOGPROB_TOLERANCE
            worst = max((torch.tensor(r["vllm"][b][1:]) - r["megatron"][b, 1 : len(s)]).abs().max().item()
                        for b, s in enumerate(CHECK))
            assert worst <= LOGPROB_TOLERANCE, f"{name}: vLLM vs Megatron after the staged push: {worst:.2e}"
            assert r["checksum_staged"] == r["checksum_legacy"] != checksum_before[0]
    finally:
        restore = WeightPushOptions(verify="checksum")
        rollout_group.push_weights(iter(checkpoint_state_dict(tiny_moe_dir).items()), restore)
    assert rollout_group.weights_checksums() == checksum_before
