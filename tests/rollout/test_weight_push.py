"""Weight push into the shared engine: buckets over the Ray object store, HF-exact log-probs after
the push, digest and checksum verification, bit-exact restore of the checkpoint."""

import pytest
import torch

from megarl.rollout import RolloutRequest, SamplingOptions
from megarl.rollout.weight_sync import (
    WeightPusher,
    WeightPushError,
    WeightPushOptions,
    get_transport_class,
    iter_buckets,
    registered_transports,
)
from tests.rollout.reference import checkpoint_state_dict, hf_model_with, max_logprob_error, perturbed_state_dict

REQUESTS = [RolloutRequest(messages=[{"role": "user", "content": "Solve x + 3 = 7."}]), RolloutRequest(prompt_token_ids=[20, 21, 22])]
SAMPLING = SamplingOptions(n=4, max_tokens=20, seed=5)


def test_iter_buckets_groups_by_bytes_in_order():
    tensors = [(f"w{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(iter_buckets(iter(tensors), bucket_bytes=80))  # 20 floats per bucket
    assert [[name for name, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4"], ["w5"]]
    assert [name for b in buckets for name, _ in b] == [name for name, _ in tensors]
    with pytest.raises(ValueError, match="positive"):
        list(iter_buckets(iter(tensors), 0))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        list(iter_buckets(iter([("x", [1.0])]), 10))


def test_transports_registered_and_gpu_ones_fail_clearly_on_cpu():
    assert registered_transports() == ["cuda_ipc", "inline", "nccl", "object_store"]
    for name in ("cuda_ipc", "nccl"):
        with pytest.raises(RuntimeError, match="object_store"):
            get_transport_class(name)()
    with pytest.raises(KeyError, match="registered: .*object_store"):
        WeightPushOptions(transport="rdma")
    with pytest.raises(ValueError, match="verify"):
        WeightPushOptions(verify="maybe")


def test_non_sender_only_drains_the_iterator():
    seen = []

    def stream():
        for i in range(3):
            seen.append(i)
            yield f"w{i}", torch.ones(2)

    stats = WeightPusher(["not-an-engine"]).push(stream(), is_sender=False)
    assert seen == [0, 1, 2] and stats.tensors == 0


@pytest.mark.vllm
def test_push_makes_engine_equal_to_pushed_weights_then_restores_checkpoint(rollout_group, tiny_moe_dir, hf_model):
    before = rollout_group.generate(REQUESTS, SAMPLING)
    checksum_before = rollout_group.weights_checksums()
    version_before = rollout_group.health()[0].weights_version

    new_weights = perturbed_state_dict(tiny_moe_dir, scale=0.05)
    options = WeightPushOptions(transport="object_store", bucket_mb=0.04, verify="all", timeout_s=120)
    stats = rollout_group.push_weights(iter(new_weights.items()), options)
    assert stats.tensors == len(new_weights) and stats.buckets >= 10
    assert stats.bytes == sum(t.numel() * 4 for t in new_weights.values())
    assert stats.weights_version == version_before + 1
    assert stats.engine_checksums != checksum_before

    after = rollout_group.generate(REQUESTS, SAMPLING)
    samples_after = [s for r in after for s in r]
    assert max_logprob_error(hf_model_with(tiny_moe_dir, new_weights), samples_after) < 1e-4
    assert max_logprob_error(hf_model, samples_after) > 1e-2  # the old weights no longer explain them
    changed = sum(a.token_ids != b.token_ids for r0, r1 in zip(before, after) for a, b in zip(r0, r1))
    assert changed >= 6, f"only {changed}/8 samples changed after the push"

    # Push the checkpoint back (one big bucket): bit-identical kernel weights, original samples.
    restore = rollout_group.push_weights(iter(checkpoint_state_dict(tiny_moe_dir).items()), WeightPushOptions(verify="checksum"))
    assert restore.buckets == 1 and restore.engine_checksums == checksum_before
    again = rollout_group.generate(REQUESTS, SAMPLING)
    assert [[s.token_ids for s in r] for r in again] == [[s.token_ids for s in r] for r in before]
    assert max_logprob_error(hf_model, [s for r in again for s in r]) < 1e-4


@pytest.mark.vllm
def test_push_of_nothing_is_an_error(rollout_group, hf_model):
    version = rollout_group.health()[0].weights_version
    with pytest.raises(WeightPushError, match="no tensors"):
        rollout_group.push_weights(iter([]))
    assert rollout_group.health()[0].weights_version == version  # a failed push is not a new version
    # The aborted push left the engine's weights as they were.
    samples = rollout_group.generate(REQUESTS[1:], SamplingOptions(n=2, max_tokens=8, seed=1))[0]
    assert max_logprob_error(hf_model, samples) < 1e-4


def test_logprob_probe_and_options_refuse_bad_input_before_any_work():
    from megarl.rollout.weight_sync import LogprobProbe, probe_sequences

    assert probe_sequences(512) == probe_sequences(512)  # the same probe on every rank and push
    assert all(3 <= t < 512 for s in probe_sequences(512) for t in s) and len(probe_sequences(512)[0]) == 24
    with pytest.raises(ValueError, match="one log-prob per token"):
        LogprobProbe([[1, 2, 3]], [[0.0, -1.0]])
    with pytest.raises(ValueError, match="logprob_atol"):
        WeightPushOptions(verify="logprobs", logprob_atol=0.0)
    # verify="logprobs" without the trainer's log-probs: refused before any engine is called
    with pytest.raises(ValueError, match="LogprobProbe"):
        WeightPusher(["not-an-engine"], WeightPushOptions(verify="logprobs")).push(iter([("w", torch.ones(1))]))


def test_gpu_transport_channels_per_sender():
    from megarl.rollout.weight_sync.cuda_ipc import local_index_of
    from megarl.rollout.weight_sync.nccl import group_port

    # one NCCL group per (sender = pipeline stage, engine): distinct ports from one base port
    ports = {group_port(29555, s, e, 3) for s in range(8) for e in range(3)}
    assert ports == set(range(29555, 29555 + 24))
    with pytest.raises(ValueError, match="outside 1024..65535"):
        group_port(65530, 7, 2, 3)
    with pytest.raises(ValueError, match="engine_index"):
        group_port(29555, 0, 3, 3)
    # a CUDA IPC handle is opened on the receiver's index of the sender's GPU, found by UUID
    assert local_index_of("GPU-b", ["GPU-a", "GPU-b"]) == 1
    with pytest.raises(RuntimeError, match="'nccl'"):
        local_index_of("GPU-c", ["GPU-a", "GPU-b"])


def test_push_stats_of_several_senders_add_up():
    from megarl.rollout.weight_sync import PushStats

    total = PushStats(senders=2)
    total.add(PushStats(tensors=3, bytes=30, buckets=2, send_seconds=1.0, engine_load_seconds=0.5))
    total.add(PushStats(tensors=4, bytes=50, buckets=1, send_seconds=2.0, engine_load_seconds=0.2))
    assert (total.tensors, total.bytes, total.buckets, total.send_seconds, total.engine_load_seconds) == (7, 80, 3, 2.0, 0.5)


@pytest.mark.vllm
def test_logprobs_verification_passes_for_true_weights_and_catches_wrong_ones(rollout_group, tiny_moe_dir, hf_model):
    from megarl.rollout.weight_sync import LogprobProbe, probe_sequences
    from tests.rollout.reference import hf_token_logprobs

    sequences = probe_sequences(hf_model.config.vocab_size)
    with torch.no_grad():
        reference = LogprobProbe(sequences, [[0.0] + hf_token_logprobs(hf_model, s, 1).tolist() for s in sequences])
    checkpoint = checkpoint_state_dict(tiny_moe_dir)
    options = WeightPushOptions(verify="logprobs", logprob_atol=1e-5, bucket_mb=0.1)
    stats = rollout_group.pusher(options).push(iter(checkpoint.items()), probe=reference)
    assert stats.logprob_max_diff < 1e-5 and stats.engine_tensors_received == [len(checkpoint)]
    try:
        with pytest.raises(WeightPushError, match="log-probs of probe sequence"):
            rollout_group.pusher(options).push(iter(perturbed_state_dict(tiny_moe_dir, scale=0.02).items()), probe=reference)
        # a tensor sent twice (two senders exporting it) is refused, counted by the engine
        twice = [*checkpoint.items(), ("model.norm.weight", checkpoint["model.norm.weight"])]
        with pytest.raises(WeightPushError, match="more than once"):
            rollout_group.pusher(WeightPushOptions()).push(iter(twice))
    finally:
        rollout_group.push_weights(iter(checkpoint.items()), WeightPushOptions(verify="checksum"))


@pytest.mark.vllm
def test_a_push_failing_halfway_keeps_the_version_and_drains_the_exporter(rollout_group, tiny_moe_dir, hf_model):
    """The sender's exporter runs collectives with the other training ranks: it must be walked to the
    end even when the push fails, or they hang. The engine keeps its version; a full push repairs it."""
    version = rollout_group.health()[0].weights_version
    weights = list(perturbed_state_dict(tiny_moe_dir, scale=0.5).items())
    walked = []

    def exporter():
        for i, (name, tensor) in enumerate(weights):
            walked.append(name)
            yield (name, "not a tensor") if i == len(weights) // 2 else (name, tensor)

    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        rollout_group.push_weights(exporter(), WeightPushOptions(bucket_mb=0.04))
    assert len(walked) == len(weights)
    assert rollout_group.health()[0].weights_version == version
    rollout_group.push_weights(iter(checkpoint_state_dict(tiny_moe_dir).items()))
    samples = rollout_group.generate(REQUESTS[1:], SamplingOptions(n=2, max_tokens=8, seed=1))[0]
    assert max_logprob_error(hf_model, samples) < 1e-4
