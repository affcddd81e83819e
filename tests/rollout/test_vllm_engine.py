"""The vLLM engine actor: n samples with log-probs equal to HF transformers', the log-prob
convention, seeds, validation, sleep on CPU."""

import pytest

from megarl.rollout import RolloutRequest, SamplingOptions
from tests.rollout.reference import max_logprob_error

pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


def test_generate_n4_with_logprobs_equal_to_hf(rollout_group, hf_model, tokenizer):
    requests = [RolloutRequest(messages=CHAT, metadata={"label": 4}), RolloutRequest(prompt_token_ids=[5, 6, 7, 8])]
    results = rollout_group.generate(requests, SamplingOptions(n=4, max_tokens=24, seed=7))
    assert [len(r) for r in results] == [4, 4]
    expected_prompt = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    expected_prompt = list(expected_prompt["input_ids"] if hasattr(expected_prompt, "keys") else expected_prompt)
    assert results[0][0].prompt_token_ids == expected_prompt
    assert results[1][0].prompt_token_ids == [5, 6, 7, 8]
    for i, samples in enumerate(results):
        assert [s.sample_index for s in samples] == [0, 1, 2, 3]
        assert len({tuple(s.token_ids) for s in samples}) > 1, "the n samples of one prompt should differ"
        for s in samples:
            assert s.request_index == i
            assert 1 <= len(s.token_ids) == len(s.logprobs) <= 24
            assert s.finish_reason in ("stop", "length")
            assert (s.finish_reason == "length") == (len(s.token_ids) == 24 and s.token_ids[-1] != tokenizer.eos_token_id)
            assert s.messages[-1] == {"role": "assistant", "content": s.text}
            assert all(lp <= 0 for lp in s.logprobs)
    assert results[0][0].messages[:-1] == CHAT and results[0][0].metadata == {"label": 4}
    assert results[1][0].messages == [{"role": "assistant", "content": results[1][0].text}]
    assert max_logprob_error(hf_model, [s for r in results for s in r]) < 1e-4


def test_processed_logprobs_are_of_the_tempered_distribution(rollout_group, hf_model):
    """logprobs_mode=processed_logprobs: log_softmax(logits / T); the raw distribution differs."""
    samples = rollout_group.generate([RolloutRequest(prompt_token_ids=[9, 10, 11])], SamplingOptions(n=2, temperature=0.7, max_tokens=16, seed=3))[0]
    assert max_logprob_error(hf_model, samples, temperature=0.7) < 1e-4
    assert max_logprob_error(hf_model, samples, temperature=1.0) > 1e-2


def test_same_seed_same_samples_and_greedy_is_deterministic(rollout_group):
    request = [RolloutRequest(prompt_token_ids=[12, 13, 14])]
    a = rollout_group.generate(request, SamplingOptions(n=2, max_tokens=12, seed=11))[0]
    b = rollout_group.generate(request, SamplingOptions(n=2, max_tokens=12, seed=11))[0]
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    g1 = rollout_group.generate(request, SamplingOptions(temperature=0.0, max_tokens=12))[0][0]
    g2 = rollout_group.generate(request, SamplingOptions(temperature=0.0, max_tokens=12))[0][0]
    assert g1.token_ids == g2.token_ids


def test_per_request_sampling_and_stop_token(rollout_group):
    first = rollout_group.generate([RolloutRequest(prompt_token_ids=[5, 6])], SamplingOptions(temperature=0.0, max_tokens=8))[0][0]
    stop_at = first.token_ids[2]
    requests = [
        RolloutRequest(prompt_token_ids=[5, 6], sampling=SamplingOptions(temperature=0.0, max_tokens=8, stop_token_ids=(stop_at,))),
        RolloutRequest(prompt_token_ids=[5, 6], sampling=SamplingOptions(n=3, max_tokens=5, seed=1)),
    ]
    stopped, three = rollout_group.generate(requests, SamplingOptions(max_tokens=2))
    assert stopped[0].token_ids == first.token_ids[: first.token_ids.index(stop_at) + 1]
    assert stopped[0].finish_reason == "stop" and stopped[0].stop_reason == stop_at
    assert len(three) == 3 and all(len(s.token_ids) == 5 for s in three)


def test_bad_inputs_fail_before_any_work():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingOptions(n=0)
    with pytest.raises(ValueError, match="messages"):
        RolloutRequest()
    from megarl.rollout import VLLMEngineConfig

    with pytest.raises(ValueError, match="logprobs_mode"):
        VLLMEngineConfig(model=".", logprobs_mode="logits")
    with pytest.raises(ValueError, match="local HF checkpoint"):
        VLLMEngineConfig(model="Qwen/Qwen3-30B-A3B")


def test_sleep_is_a_documented_noop_on_cpu(rollout_group, tiny_moe_dir):
    assert rollout_group.sleep() == [False]
    assert rollout_group.wake_up() == [False]
    health = rollout_group.health()
    assert health[0].ok and not health[0].sleeping and health[0].model == tiny_moe_dir

    from megarl.rollout import VLLMEngine, VLLMEngineConfig

    with pytest.raises(ValueError, match="sleep_mode is not supported by vLLM on CPU"):
        VLLMEngine(VLLMEngineConfig.for_cpu_tests(tiny_moe_dir, enable_sleep_mode=True))


def test_score_gives_token_aligned_logprobs_of_given_sequences(rollout_group, hf_model):
    import ray
    import torch

    from tests.rollout.reference import hf_token_logprobs

    sample = rollout_group.generate([RolloutRequest(prompt_token_ids=[7, 8, 9])], SamplingOptions(max_tokens=10, seed=2))[0][0]
    sequences = [sample.all_token_ids, [3, 4, 5, 6, 100, 200]]
    scores = ray.get(rollout_group.engines[0].score.remote(sequences))
    for seq, score in zip(sequences, scores):
        assert len(score) == len(seq) and score[0] == 0.0
        assert (torch.tensor(score[1:]) - hf_token_logprobs(hf_model, seq, 1)).abs().max() < 1e-4
    assert max(abs(a - b) for a, b in zip(scores[0][3:], sample.logprobs)) < 1e-4
