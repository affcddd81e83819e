"""launch/demo.py's one-line summaries and its synthetic data per trainer type."""

import json

from launch.demo import _records, summary


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_summaries_report_first_and_last(tmp_path):
    rl = _write(tmp_path / "rl.jsonl", [{"step": s, "reward/score/mean": s / 10} for s in range(1, 11)])
    assert summary("rl", rl) == "mean reward first 20% of steps 0.150, last 20% 0.950, gain +0.800"
    sft = _write(tmp_path / "sft.jsonl", [{"step": 2, "val/loss": 0.5}, {"step": 1}, {"step": 4, "val/loss": 0.25}])
    assert summary("sft", sft) == "validation loss 0.5000 (step 2) -> 0.2500 (step 4)"
    dpo = _write(tmp_path / "dpo.jsonl", [{"step": 5, "val/loss": 0.6, "val/rewards/accuracies": 0.5},
                                         {"step": 10, "val/loss": 0.1, "val/rewards/accuracies": 0.875}])
    assert summary("dpo", dpo).endswith("reward accuracy 0.500 -> 0.875")


def test_each_trainer_type_gets_its_data_shape():
    assert set(_records("rl", 2, 0, "train")[0]) >= {"prompt", "reward_model"}
    assert set(_records("sft", 2, 0, "train")[0]) == {"messages"}
    assert set(_records("dpo", 2, 0, "train")[0]) == {"prompt", "chosen", "rejected"}
