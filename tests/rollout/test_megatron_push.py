"""Megatron → vLLM: after one optimizer step at TP2 and at EP2 (gloo, 2 ranks), every rank
iterates `export_hf_weights`, rank 0 pushes the buckets to two engines over the Ray object store.
Then vLLM's log-probs of fixed sequences equal Megatron's (1e-4, fp32), the generated samples
change, and both engines hold bit-identical weights (checksum).

The engines: the session's shared engine plus one started here (named actors, so the gloo ranks —
separate processes that join the Ray cluster — find them). The checkpoint is pushed back at the end.
"""

import io

import pytest
import torch

from megarl.rollout import EngineGroup, EngineGroupOptions, RolloutRequest, SamplingOptions, VLLMEngineConfig
from megarl.testing.distributed import run_on_ranks
from tests.rollout.conftest import SHARED_ENGINE_NAME
from tests.rollout.reference import checkpoint_state_dict

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

EXTRA_ENGINE_NAME = "megarl-test-push-extra"
FIXED = [[1, 5, 9, 33, 70, 120, 7, 8, 200, 311], [2, 4, 6, 8, 10, 12, 14]]
PROBE = [RolloutRequest(prompt_token_ids=[5, 6, 7]), RolloutRequest(prompt_token_ids=[40, 41])]
PROBE_SAMPLING = SamplingOptions(n=4, max_tokens=16, seed=21)
LAYOUTS = [("tp2", {"tp": 2}), ("ep2", {"ep": 2})]


def train_and_push(model_dir: str, gcs_address: str) -> bytes:
    """On each gloo rank: per layout, build from the checkpoint, one AdamW step, Megatron log-probs
    of FIXED, push (rank 0 sends), then (rank 0) ask both engines for log-probs, samples, checksums."""
    import ray

    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.batch import SequenceBatch
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine, MicroBatchOptions
    from megarl.models.optimizer import OptimizerOptions
    from megarl.rollout import engine_handles, init_ray
    from megarl.rollout.weight_sync import WeightPusher, WeightPushOptions

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ["RANK"])
    engines = None
    if rank == 0:
        init_ray(address=gcs_address)
        engines = engine_handles(SHARED_ENGINE_NAME, 1) + engine_handles(EXTRA_ENGINE_NAME, 1)
    gen = torch.Generator().manual_seed(3)
    train_seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (12, 9, 15, 7)]
    batch = SequenceBatch.from_sequences(
        train_seqs, loss_mask=[[0.0] * 2 + [1.0] * (len(s) - 2) for s in train_seqs],
        advantages=[[1.0 if i % 2 else -1.0] * len(s) for i, s in enumerate(train_seqs)],
    )
    num_loss_tokens = float(batch.fields["loss_mask"].sum())

    def loss_fn(logprobs, entropy, mb):
        mask, adv = mb.fields["loss_mask"], mb.fields["advantages"]
        return (mask * -adv * logprobs).sum() / num_loss_tokens, {}

    fixed = SequenceBatch.from_sequences(FIXED)
    results = {}
    for name, layout_kwargs in LAYOUTS:
        layout = ParallelLayout(**layout_kwargs)
        init_distributed(layout)
        engine = MegatronEngine(
            build_megatron_model(model_dir, layout),
            EngineOptions(micro_batches=MicroBatchOptions(max_tokens_per_gpu=64), optimizer=OptimizerOptions(lr=2e-2, weight_decay=0.0, use_distributed_optimizer=False)),
        )
        before, _ = engine.forward_logprobs(fixed)
        step = engine.train_step(batch, loss_fn)
        after, _ = engine.forward_logprobs(fixed)
        pusher = WeightPusher(engines or ["unused on non-senders"], WeightPushOptions(bucket_mb=0.1, verify="all", timeout_s=300))
        stats = pusher.push(engine.export_hf_weights(), is_sender=rank == 0)
        if rank == 0:
            results[name] = {
                "megatron_before": before, "megatron_after": after, "step_ok": step.update_successful,
                "buckets": stats.buckets, "tensors": stats.tensors, "push_checksums": stats.engine_checksums,
                "vllm_scores": [ray.get(e.score.remote(FIXED)) for e in engines],
                "samples": [ray.get(e.generate.remote(PROBE, PROBE_SAMPLING)) for e in engines],
                "checksums": ray.get([e.weights_checksum.remote() for e in engines]),
            }
        del engine
        reset_model_parallel()
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def extra_engine(ray_cluster, rollout_group, tiny_moe_dir):
    group = EngineGroup(
        VLLMEngineConfig.for_cpu_tests(tiny_moe_dir),
        EngineGroupOptions(num_engines=1, engine_cpus=0.5, name=EXTRA_ENGINE_NAME, start_timeout_s=300),
    )
    yield group
    group.shutdown()


def test_megatron_step_then_push_matches_megatron_logprobs(rollout_group, extra_engine, tiny_moe_dir):
    import ray

    baseline = rollout_group.generate(PROBE, PROBE_SAMPLING)
    assert extra_engine.weights_checksums() == rollout_group.weights_checksums()
    gcs_address = ray.get_runtime_context().gcs_address
    try:
        per_rank = run_on_ranks(train_and_push, world_size=2, args=(tiny_moe_dir, gcs_address), timeout=600)
        results = torch.load(io.BytesIO(per_rank[0]), weights_only=False)
        for name, _ in LAYOUTS:
            r = results[name]
            assert r["step_ok"] and r["buckets"] >= 5 and r["tensors"] == len(checkpoint_state_dict(tiny_moe_dir))
            moved = max((r["megatron_after"][b] - r["megatron_before"][b]).abs().max().item() for b in range(len(FIXED)))
            assert moved > 1e-2, f"{name}: the optimizer step barely changed the model ({moved:.1e})"
            worst = 0.0
            for engine_scores in r["vllm_scores"]:
                for b, seq in enumerate(FIXED):
                    diff = (torch.tensor(engine_scores[b]) - r["megatron_after"][b, : len(seq)]).abs().max().item()
                    assert diff < 1e-4, f"{name}: vLLM vs Megatron log-probs differ by {diff:.2e} on sequence {b}"
                    worst = max(worst, diff)
            print(f"{name}: step moved log-probs by {moved:.2e}; vLLM vs Megatron after push {worst:.2e}")
            assert len(set(r["checksums"])) == 1 and r["push_checksums"] == r["checksums"]
            first_engine, second_engine = r["samples"]
            assert [[s.token_ids for s in q] for q in first_engine] == [[s.token_ids for s in q] for q in second_engine]
            changed = sum(a.token_ids != b.token_ids for q0, q1 in zip(baseline, first_engine) for a, b in zip(q0, q1))
            assert changed >= 6, f"{name}: only {changed}/8 samples changed after the push"
    finally:
        checkpoint = checkpoint_state_dict(tiny_moe_dir)
        from megarl.rollout.weight_sync import WeightPusher, WeightPushOptions

        WeightPusher(rollout_group.engines + extra_engine.engines, WeightPushOptions(verify="checksum")).push(iter(checkpoint.items()))
    assert [[s.token_ids for s in q] for q in rollout_group.generate(PROBE, PROBE_SAMPLING)] == [[s.token_ids for s in q] for q in baseline]
