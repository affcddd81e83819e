"""tools/prepare_data.py: GSM8K / MATH question-answer JSONL and the synthetic task → verl parquet."""

import json
import os
import subprocess
import sys

import pytest

from megarl.data import DataFormatError, RLDataset, RLDatasetConfig, read_records
from megarl.data.prepare import INSTRUCTIONS
from megarl.rewards import get_reward

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "prepare_data.py")

GSM8K_ROWS = [
    {"question": "Tom has 3 boxes of 24 pens. How many pens?", "answer": "3 boxes * 24 = <<3*24=72>>72 pens.\n#### 72"},
    {"question": "A car costs $1,000 more than 0.", "answer": "It costs $1,000.\n#### 1,000"},
]
MATH_ROWS = [
    {"problem": "What is $1/2$ as a fraction?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Simplify $\\sqrt{8}$.", "solution": "$\\sqrt{8} = \\boxed{2\\sqrt{2}}$"},
]


def prepare(*args):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("prepare_data_tool", TOOL)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from megarl.utils.tiny_models import build_tokenizer

    return build_tokenizer()


def test_gsm8k_to_verl_parquet(tmp_path, tokenizer):
    out = str(tmp_path / "gsm8k.parquet")
    assert prepare("--input", write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS), "--output", out, "--split", "test") == 0
    rows = read_records(out)
    assert [r["reward_model"] for r in rows] == [{"style": "rule", "ground_truth": "72"},
                                                  {"style": "rule", "ground_truth": "1000"}]
    assert rows[0]["data_source"] == "openai/gsm8k" and rows[0]["ability"] == "math"
    assert rows[0]["prompt"] == [{"role": "user", "content": f"{GSM8K_ROWS[0]['question']} {INSTRUCTIONS['gsm8k']}"}]
    assert rows[1]["extra_info"] == {"split": "test", "index": 1, "question": GSM8K_ROWS[1]["question"],
                                     "answer": GSM8K_ROWS[1]["answer"]}
    # The reference solutions score 1.0 against the extracted ground truths through the default reward.
    reward = get_reward("default").fn
    assert [reward(r["data_source"], r["extra_info"]["answer"], r["reward_model"]["ground_truth"]) for r in rows] \
        == [1.0, 1.0]
    assert len(RLDataset(RLDatasetConfig(files=[out]), tokenizer)) == 2


def test_math_to_verl_parquet(tmp_path):
    out = str(tmp_path / "math.parquet")
    prepare("--input", write_jsonl(tmp_path / "m.jsonl", MATH_ROWS), "--output", out, "--style", "math",
            "--data-source", "HuggingFaceH4/MATH-500")
    rows = read_records(out)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["\\frac{1}{2}", "2\\sqrt{2}"]
    assert rows[0]["data_source"] == "HuggingFaceH4/MATH-500"
    assert rows[0]["prompt"][0]["content"].endswith("within \\boxed{}.")
    reward = get_reward("default").fn
    assert [reward(r["data_source"], r["extra_info"]["answer"], r["reward_model"]["ground_truth"]) for r in rows] \
        == [1.0, 1.0]
    assert reward("HuggingFaceH4/MATH-500", "\\boxed{0.5}", rows[0]["reward_model"]["ground_truth"]) == 1.0


def test_answers_without_a_final_answer_are_errors(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], {"question": "q", "answer": "no marker here"}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl row 1: cannot tell the answer style"):
        prepare("--input", bad, "--output", str(tmp_path / "x.parquet"))
    with pytest.raises(DataFormatError, match=r"row 1: no final answer found; a gsm8k answer needs '#### <answer>'"):
        prepare("--input", bad, "--output", str(tmp_path / "x.parquet"), "--style", "gsm8k")
    missing = write_jsonl(tmp_path / "mq.jsonl", [{"text": "q", "answer": "#### 1"}])
    with pytest.raises(DataFormatError, match="missing required field 'question'"):
        prepare("--input", missing, "--output", str(tmp_path / "x.parquet"))


def test_synthetic_flag_runs_as_a_script(tmp_path):
    out = str(tmp_path / "arith.parquet")
    result = subprocess.run([sys.executable, TOOL, "--synthetic-arith", "16", "--seed", "3", "--output", out],
                            capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "wrote 16 rows" in result.stdout
    rows = read_records(out)
    assert len(rows) == 16 and {r["data_source"] for r in rows} == {"synthetic/arith"}
    from megarl.data import arith_records

    assert rows == arith_records(16, seed=3)
