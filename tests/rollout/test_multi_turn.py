"""Multi-turn episodes on the shared engine with deterministic toy environments: turn counts,
max_turns, loss mask zero exactly on environment tokens, rollout log-probs equal to HF's."""

import os

import pytest
import torch

from megarl.rollout import RolloutRequest, SamplingOptions
from megarl.rollout.multi_turn import MultiTurnScheduler, load_scheduler, register_scheduler, run_multi_turn
from tests.rollout.reference import hf_token_logprobs

HERE = os.path.dirname(__file__)
CHAT = [{"role": "user", "content": "What is 3 + 5?"}]
CHUNK = SamplingOptions(n=2, max_tokens=6, ignore_eos=True, seed=3)


def chat_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.vllm
def test_new_turn_env_tokens_are_masked_and_logprobs_match_hf(rollout_group, tokenizer, hf_model):
    env_cls = load_scheduler(os.path.join(HERE, "toy_env.py") + ":CountingFeedbackEnv")
    trajectories = run_multi_turn(rollout_group, [RolloutRequest(messages=CHAT)], CHUNK, env_cls(tokenizer, max_turns=3))
    assert len(trajectories) == 1 and len(trajectories[0]) == 2
    prompt = chat_ids(tokenizer, CHAT)
    for traj in trajectories[0]:
        assert traj.finished and traj.num_turns == 3 and traj.finish_reason == "length"
        # Expected layout, built independently: prompt, then per turn 6 generated tokens followed by
        # the template's tokens for "<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n".
        pos, mask, env_segments = len(prompt), [0] * len(prompt), []
        assert traj.token_ids[: len(prompt)] == prompt and traj.prompt_len == len(prompt)
        for turn in range(3):
            mask += [1] * 6
            pos += 6
            if turn < 2:
                env_text = f"<|im_end|>\n<|im_start|>user\nTurn {turn} seen 6 tokens.<|im_end|>\n<|im_start|>assistant\n"
                env_ids = tokenizer.encode(env_text, add_special_tokens=False)
                assert traj.token_ids[pos : pos + len(env_ids)] == env_ids
                env_segments.append((pos, pos + len(env_ids)))
                mask += [0] * len(env_ids)
                pos += len(env_ids)
        assert len(traj.token_ids) == pos and traj.loss_mask == mask
        assert len(traj.rollout_logprobs) == pos
        assert all(traj.rollout_logprobs[t] == 0.0 for t in range(pos) if mask[t] == 0)
        assert all(traj.rollout_logprobs[t] < 0.0 for t in range(pos) if mask[t] == 1)
        # The whole sequence as the model saw it: engine log-probs equal HF's on generated tokens.
        ref = hf_token_logprobs(hf_model, traj.token_ids, 1)
        generated = torch.tensor(mask[1:]).bool()
        assert (torch.tensor(traj.rollout_logprobs[1:])[generated] - ref[generated]).abs().max() < 1e-4
        roles = [m["role"] for m in traj.messages]
        assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert [m["content"] for m in traj.messages[2::2]] == ["Turn 0 seen 6 tokens.", "Turn 1 seen 6 tokens."]
    assert trajectories[0][0].token_ids != trajectories[0][1].token_ids


@pytest.mark.vllm
def test_continue_mode_inserts_text_inside_the_assistant_turn(rollout_group, tokenizer):
    env_cls = load_scheduler("tests.rollout.toy_env:ToolOutputEnv")
    request = RolloutRequest(prompt_token_ids=[30, 31, 32], messages=CHAT)
    traj = run_multi_turn(rollout_group, [request], CHUNK.with_(n=1), env_cls(tokenizer, max_turns=2))[0][0]
    inserted = tokenizer.encode("\n<output>0</output>\n", add_special_tokens=False)
    assert traj.num_turns == 2
    assert traj.loss_mask == [0] * 3 + [1] * 6 + [0] * len(inserted) + [1] * 6
    assert traj.token_ids[9 : 9 + len(inserted)] == inserted
    assert [m["role"] for m in traj.messages] == ["user", "assistant"]
    assert "<output>0</output>" in traj.messages[-1]["content"]


class _AlwaysContinue(MultiTurnScheduler):
    def step(self, request, result, turn):
        from dataclasses import replace

        return replace(request, prompt_token_ids=result.all_token_ids + [40])


@pytest.mark.vllm
def test_default_check_finished_stops_on_length_and_at_max_turns(rollout_group, tokenizer):
    request = [RolloutRequest(prompt_token_ids=[5, 6, 7])]
    by_length = run_multi_turn(rollout_group, request, SamplingOptions(max_tokens=4, ignore_eos=True), _AlwaysContinue(tokenizer, 5))
    assert by_length[0][0].num_turns == 1 and by_length[0][0].finish_reason == "length"

    class StopOnlyAtMax(_AlwaysContinue):
        def check_finished(self, request, result, turn):
            return turn + 1 >= self.max_turns

    traj = run_multi_turn(rollout_group, request, SamplingOptions(max_tokens=4, ignore_eos=True), StopOnlyAtMax(tokenizer, 4))[0][0]
    assert traj.num_turns == 4 and traj.loss_mask == [0] * 3 + ([1] * 4 + [0]) * 3 + [1] * 4
    capped = run_multi_turn(rollout_group, request, SamplingOptions(max_tokens=4, ignore_eos=True), StopOnlyAtMax(tokenizer, 4), max_total_tokens=14)
    assert capped[0][0].num_turns == 2 and capped[0][0].finish_reason == "length"


@pytest.mark.vllm
def test_rewriting_earlier_tokens_is_rejected(rollout_group, tokenizer):
    env_cls = load_scheduler(os.path.join(HERE, "toy_env.py") + ":RewritesHistoryEnv")
    with pytest.raises(ValueError, match="append-only"):
        run_multi_turn(rollout_group, [RolloutRequest(messages=CHAT)], CHUNK.with_(n=1), env_cls(tokenizer, max_turns=3))


def test_scheduler_registry():
    assert load_scheduler("single_turn").__name__ == "SingleTurnScheduler"
    with pytest.raises(KeyError, match="registered: .*single_turn"):
        load_scheduler("chess")
    with pytest.raises(FileNotFoundError):
        load_scheduler("no/such/file.py:Env")
    with pytest.raises(TypeError, match="not a MultiTurnScheduler"):
        load_scheduler("os.path:join")

    @register_scheduler("toy_always_continue")
    class Toy(_AlwaysContinue):
        pass

    assert load_scheduler("toy_always_continue") is Toy
    register_scheduler("toy_always_continue")(Toy)  # the same class again (a module imported twice): kept

    class Other(_AlwaysContinue):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_scheduler("toy_always_continue")(Other)
