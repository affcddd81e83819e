"""RLDataset: verl schema from parquet and JSONL, chat templating, length limits, clear format errors."""

import json

import pytest

from megarl.data import DataFormatError, RLDataset, RLDatasetConfig, read_records
from megarl.data.records import write_records


def row(question, answer="4", data_source="openai/gsm8k", **overrides):
    record = {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": "train", "index": 0},
    }
    record.update(overrides)
    return record


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def expected_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_parquet_and_jsonl_give_the_same_templated_prompts(tmp_path, tokenizer):
    records = [row("What is 2 + 2?"), row("Compute 8 + 1.", "9", data_source="synthetic/arith",
                                        prompt=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Compute 8 + 1."}])]
    write_records(records, str(tmp_path / "d.parquet"))
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    from_parquet = RLDataset(RLDatasetConfig(files=[str(tmp_path / "d.parquet")]), tokenizer)
    from_jsonl = RLDataset(RLDatasetConfig(files=[jsonl]), tokenizer)
    assert len(from_parquet) == len(from_jsonl) == 2
    for i in range(2):
        a, b = from_parquet[i], from_jsonl[i]
        assert a == b
        assert a.prompt_ids == expected_ids(tokenizer, records[i]["prompt"])
    sample = from_parquet[1]
    assert tokenizer.decode(sample.prompt_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                                   "Compute 8 + 1.<|im_end|>\n<|im_start|>assistant\n")
    assert (sample.data_source, sample.ground_truth, sample.ability, sample.reward_style) == \
        ("synthetic/arith", "9", "math", "rule")
    assert sample.extra_info == {"split": "train", "index": 0}


def test_pandas_written_parquet_and_custom_prompt_key(tmp_path, tokenizer):
    # verl's preprocessing scripts write parquet through pandas / datasets
    import pandas as pd
    frame = pd.DataFrame([row("q1"), row("q2")]).rename(columns={"prompt": "question_chat"})
    frame.to_parquet(tmp_path / "p.parquet")
    ds = RLDataset(RLDatasetConfig(files=[str(tmp_path / "p.parquet")], prompt_key="question_chat"), tokenizer)
    assert [s.messages[0]["content"] for s in (ds[0], ds[1])] == ["q1", "q2"]
    assert ds[1].index == 1


def test_a_plain_string_prompt_is_one_user_message(tmp_path, tokenizer):
    ds = RLDataset(RLDatasetConfig(files=[write_jsonl(tmp_path / "s.jsonl", [row("x", prompt="What is 3 + 5?")])]),
                   tokenizer)
    assert ds[0].messages == [{"role": "user", "content": "What is 3 + 5?"}]


def test_files_are_concatenated_in_order(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [row("a0"), row("a1")])
    b = write_jsonl(tmp_path / "b.jsonl", [row("b0")])
    ds = RLDataset(RLDatasetConfig(files=[a, b]), tokenizer)
    assert [ds[i].messages[0]["content"] for i in range(3)] == ["a0", "a1", "b0"]


def test_overlong_prompts_are_filtered_or_truncated(tmp_path, tokenizer):
    short, long = "Hi", "The quick brown fox jumps over the lazy dog. " * 4
    path = write_jsonl(tmp_path / "l.jsonl", [row(short), row(long), row(short)])
    full_long = expected_ids(tokenizer, [{"role": "user", "content": long}])
    limit = len(expected_ids(tokenizer, [{"role": "user", "content": short}])) + 2
    assert len(full_long) > limit

    filtered = RLDataset(RLDatasetConfig(files=[path], max_prompt_length=limit), tokenizer)
    assert len(filtered) == 2 and filtered.num_filtered == 1
    left = RLDataset(RLDatasetConfig(files=[path], max_prompt_length=limit, filter_overlong_prompts=False,
                                     truncation="left"), tokenizer)
    right = RLDataset(RLDatasetConfig(files=[path], max_prompt_length=limit, filter_overlong_prompts=False,
                                      truncation="right"), tokenizer)
    assert left[1].prompt_ids == full_long[-limit:]    # keeps the generation prompt at the end
    assert right[1].prompt_ids == full_long[:limit]
    with pytest.raises(DataFormatError, match=r"l\.jsonl row 1 prompt: \d+ tokens > max length"):
        RLDataset(RLDatasetConfig(files=[path], max_prompt_length=limit, filter_overlong_prompts=False), tokenizer)
    with pytest.raises(ValueError, match="truncation must be one of error, left, right"):
        RLDataset(RLDatasetConfig(files=[path], truncation="middle"), tokenizer)


def test_max_samples(tmp_path, tokenizer):
    ds = RLDataset(RLDatasetConfig(files=[write_jsonl(tmp_path / "m.jsonl", [row(f"q{i}") for i in range(5)])],
                                   max_samples=3), tokenizer)
    assert len(ds) == 3


@pytest.mark.parametrize("bad_row, field", [
    ({k: v for k, v in row("q").items() if k != "data_source"}, "'data_source'"),
    ({k: v for k, v in row("q").items() if k != "prompt"}, "'prompt'"),
    ({**row("q"), "reward_model": {"style": "rule"}}, "'reward_model.ground_truth'"),
    ({**row("q"), "prompt": [{"role": "user"}]}, r"prompt\[0\]"),
    ({**row("q"), "prompt": []}, "'prompt' must be a non-empty list"),
])
def test_missing_fields_name_the_field_file_and_row(tmp_path, tokenizer, bad_row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [row("fine"), bad_row])
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl row 1.*{field}"):
        RLDataset(RLDatasetConfig(files=[path]), tokenizer)


def test_missing_parquet_column_is_reported_before_reading_rows(tmp_path, tokenizer):
    records = [{k: v for k, v in row("q").items() if k != "reward_model"}]
    write_records(records, str(tmp_path / "nogt.parquet"))
    with pytest.raises(DataFormatError, match=r"nogt\.parquet: missing required field 'reward_model' \(columns:"):
        RLDataset(RLDatasetConfig(files=[str(tmp_path / "nogt.parquet")]), tokenizer)


def test_missing_file_and_unknown_format(tmp_path, tokenizer):
    with pytest.raises(DataFormatError, match="does not exist"):
        RLDataset(RLDatasetConfig(files=[str(tmp_path / "none.parquet")]), tokenizer)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unsupported dataset format"):
        read_records(str(tmp_path / "x.csv"))


def test_chat_template_kwargs_reach_the_template(tmp_path, tokenizer):
    import copy

    thinking_tokenizer = copy.deepcopy(tokenizer)
    thinking_tokenizer.chat_template = tokenizer.chat_template + (
        "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}")
    path = write_jsonl(tmp_path / "t.jsonl", [row("Hi")])
    plain = RLDataset(RLDatasetConfig(files=[path]), thinking_tokenizer)
    no_think = RLDataset(RLDatasetConfig(files=[path], chat_template_kwargs={"enable_thinking": False}),
                         thinking_tokenizer)
    assert thinking_tokenizer.decode(no_think[0].prompt_ids) == \
        thinking_tokenizer.decode(plain[0].prompt_ids) + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("prompt", ["", "   \n", [{"role": "user", "content": ""}],
                                    [{"role": "system", "content": " "}, {"role": "user", "content": ""}]])
def test_an_empty_prompt_is_refused_with_its_row_number(tmp_path, tokenizer, prompt):
    path = write_jsonl(tmp_path / "d.jsonl", [row("What is 2 + 2?"), row("q", prompt=prompt), row("Compute 8 + 1.")])
    with pytest.raises(DataFormatError, match=f"{path} row 1: field 'prompt' is an empty prompt .*"
                                              "set data.skip_invalid_rows=true"):
        RLDataset(RLDatasetConfig(files=[path]), tokenizer)


def test_skip_invalid_rows_skips_and_counts_them_keeping_the_valid_ones(tmp_path, tokenizer, caplog):
    records = [row("q0"), row("q1", prompt=[{"role": "user", "content": ""}]), row("q2"),
               row("q3", reward_model="4"), row("q4"), row("q5", prompt="")]
    write_records(records[:3], str(tmp_path / "a.parquet"))
    jsonl = write_jsonl(tmp_path / "b.jsonl", records[3:] + [{"data_source": "x"}])  # last row lacks fields
    with caplog.at_level("WARNING"):
        ds = RLDataset(RLDatasetConfig(files=[str(tmp_path / "a.parquet"), jsonl], skip_invalid_rows=True), tokenizer)
    assert [ds[i].messages[0]["content"] for i in range(len(ds))] == ["q0", "q2", "q4"]
    assert ds.num_invalid == 4
    warning = caplog.records[-1].getMessage()
    assert warning.startswith("skipped 4 of 7 prompt rows as invalid (data.skip_invalid_rows=true): ")
    assert f"a.parquet row 1: field 'prompt' is an empty prompt" in warning and f"{jsonl} row 0: field 'reward_model'" in warning


def test_skip_invalid_rows_reaches_the_dataset_from_the_run_config(tmp_path, tokenizer):
    from megarl.config.schema import MegaRLConfig
    from megarl.trainer.components import prompt_dataset

    path = write_jsonl(tmp_path / "d.jsonl", [row("q0"), row("q1", prompt=" ")])
    cfg = MegaRLConfig()
    with pytest.raises(DataFormatError, match="row 1: field 'prompt' is an empty prompt"):
        prompt_dataset(cfg, tokenizer, [path])
    cfg.data.skip_invalid_rows = True
    assert len(prompt_dataset(cfg, tokenizer, [path])) == 1
