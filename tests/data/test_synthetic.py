"""The demo's synthetic arithmetic task: correct, deterministic rows that load and score end to end."""

import pytest

from megarl.data import ARITH_DATA_SOURCE, PromptDataLoader, RLDataset, RLDatasetConfig, arith_records
from megarl.data.records import write_records
from megarl.rewards import RewardConfig, RewardManager, RewardRequest


def test_rows_are_correct_and_deterministic():
    rows = arith_records(200, seed=5, ops=("+", "-", "*"))
    assert rows == arith_records(200, seed=5, ops=("+", "-", "*"))
    assert rows != arith_records(200, seed=6, ops=("+", "-", "*"))
    for row in rows:
        question = row["prompt"][0]["content"]
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
        answer = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert answer >= 0
        assert row["reward_model"] == {"style": "rule", "ground_truth": str(answer)}
        assert row["data_source"] == ARITH_DATA_SOURCE
    assert {r["prompt"][0]["content"].split()[3] for r in rows} == {"+", "-", "*"}
    assert rows[0]["prompt"][0]["content"] == "What is 4 * 5?"  # pinned: the task must not change between releases
    with pytest.raises(ValueError, match="ops"):
        arith_records(3, ops=("/",))


def test_dataset_loader_and_reward_end_to_end(tmp_path, tokenizer):
    path = str(tmp_path / "arith.parquet")
    write_records(arith_records(12, seed=1), path)
    ds = RLDataset(RLDatasetConfig(files=[path], max_prompt_length=32), tokenizer)
    loader = PromptDataLoader(ds, batch_size=4, seed=0)
    batch = next(loader)
    state = loader.state_dict()
    following = [next(loader).samples for _ in range(4)]      # crosses into epoch 1
    resumed = PromptDataLoader(ds, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert [next(resumed).samples for _ in range(4)] == following

    requests = [RewardRequest(s.data_source, f"{s.ground_truth} is it", s.ground_truth, s.extra_info, 3)
                for s in batch.samples]
    requests[0].response = "no idea"
    with RewardManager(RewardConfig(num_workers=1)) as manager:   # the "default" reward: by data_source
        out = manager.score(requests)
    assert out.scores == [0.0, 1.0, 1.0, 1.0]
    assert out.metrics["reward/acc/mean"] == 0.75


def test_sft_conversations_answer_in_the_format(tmp_path, tokenizer):
    from megarl.data import SFTDataset, SFTDatasetConfig
    from megarl.data.synthetic import ANSWER_FORMAT, sft_arith_records

    rows = sft_arith_records(50, seed=2, system_prompt="Answer in tags.")
    assert rows == sft_arith_records(50, seed=2, system_prompt="Answer in tags.")
    for row in rows:
        system, user, assistant = row["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        a, op, b = user["content"].removeprefix("What is ").removesuffix("?").split()
        assert ANSWER_FORMAT.match(assistant["content"])
        assert assistant["content"] == f"<answer>{int(a) + int(b) if op == '+' else int(a) - int(b)}</answer>"
    # the same questions as the RL task for the same seed
    assert [r["messages"][0]["content"] for r in sft_arith_records(5, seed=4)] == \
        [r["prompt"][0]["content"] for r in arith_records(5, seed=4)]
    path = str(tmp_path / "sft.parquet")
    write_records(rows, path)
    ds = SFTDataset(SFTDatasetConfig(files=[path], max_length=64), tokenizer)
    assert len(ds) == 50
    trained = tokenizer.decode([t for t, m in zip(ds[0].input_ids, ds[0].loss_mask) if m])
    assert trained == rows[0]["messages"][-1]["content"] + "<|im_end|>\n"


def test_preference_pairs(tmp_path, tokenizer):
    from megarl.data import DPODataset, DPODatasetConfig
    from megarl.data.synthetic import ANSWER_FORMAT, preference_arith_records

    plain = preference_arith_records(40, seed=1)
    wrong = preference_arith_records(40, seed=1, rejected="wrong")
    for p, w in zip(plain, wrong):
        assert p["prompt"] == w["prompt"] and p["chosen"] == w["chosen"]
        assert ANSWER_FORMAT.match(p["chosen"]) and p["rejected"] == p["chosen"][8:-9]  # the bare number
        assert ANSWER_FORMAT.match(w["rejected"]) and w["rejected"] != w["chosen"]
        assert 0 < abs(int(w["rejected"][8:-9]) - int(w["chosen"][8:-9])) <= 3
    with pytest.raises(ValueError, match="rejected must be one of plain, wrong"):
        preference_arith_records(2, rejected="worse")
    path = str(tmp_path / "dpo.jsonl")
    write_records(plain, path)
    assert len(DPODataset(DPODatasetConfig(files=[path], max_length=64), tokenizer)) == 40
