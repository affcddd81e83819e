"""The demo's synthetic arithmetic task: correct, deterministic rows that load and score end to end."""

import pytest

from megarl.data import ARITH_DATA_SOURCE, PromptDataLoader, RLDataset, RLDatasetConfig, arith_records
from megarl.data.records import write_records
from megarl.rewards import RewardConfig, RewardManager, RewardRequest, RewardTermConfig


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
