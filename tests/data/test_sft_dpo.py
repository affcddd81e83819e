"""SFT conversations with assistant masks, and DPO pairs under their various field names."""

import json

import pytest

from megarl.data import DataFormatError, DPODataset, DPODatasetConfig, SFTDataset, SFTDatasetConfig


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 5?"},
                {"role": "assistant", "content": "8"}, {"role": "user", "content": "And 2 + 2?"},
                {"role": "assistant", "content": "4"}]


def test_sft_masks_exactly_the_assistant_turns(tmp_path, tokenizer):
    ds = SFTDataset(SFTDatasetConfig(files=[write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATION}])]),
                    tokenizer)
    sample = ds[0]
    assert len(sample.input_ids) == len(sample.loss_mask)
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    trained = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])
    assert trained == "8<|im_end|>\n4<|im_end|>\n"
    untrained = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if not m])
    assert untrained.endswith("<|im_start|>user\nAnd 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_sft_length_limit_and_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATION}])
    assert len(SFTDataset(SFTDatasetConfig(files=[path], max_length=10), tokenizer)) == 0
    cut = SFTDataset(SFTDatasetConfig(files=[path], max_length=10, filter_overlong=False, truncation="right"),
                     tokenizer)
    assert len(cut[0].input_ids) == 10
    no_assistant = write_jsonl(tmp_path / "na.jsonl", [{"messages": CONVERSATION[:2]}])
    with pytest.raises(DataFormatError, match=r"na\.jsonl row 0: 'messages' has no assistant message"):
        SFTDataset(SFTDatasetConfig(files=[no_assistant]), tokenizer)
    missing = write_jsonl(tmp_path / "mm.jsonl", [{"conversation": CONVERSATION}])
    with pytest.raises(DataFormatError, match=r"mm\.jsonl row 0: missing required field 'messages'"):
        SFTDataset(SFTDatasetConfig(files=[missing]), tokenizer)


def test_dpo_accepts_the_common_field_names(tmp_path, tokenizer):
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
        {"question": "Capital of France?", "response_chosen": "Paris", "response_rejected": "Rome"},
        {"query": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris", "negative": "Rome"},
        {"prompt": "Capital of France?",   # TRL conversational style: responses as message lists
         "chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
         "rejected": [{"role": "assistant", "content": "Rome"}]},
    ]
    ds = DPODataset(DPODatasetConfig(files=[write_jsonl(tmp_path / "p.jsonl", rows)]), tokenizer)
    assert len(ds) == 4
    for i in range(4):
        assert (ds[i].prompt_ids, ds[i].chosen_ids, ds[i].rejected_ids) == \
            (ds[0].prompt_ids, ds[0].chosen_ids, ds[0].rejected_ids)
    assert tokenizer.decode(ds[0].prompt_ids) == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ds[0].chosen_ids) == "Paris<|im_end|>\n"
    assert tokenizer.decode(ds[0].rejected_ids) == "Rome<|im_end|>\n"


def test_dpo_errors_name_the_accepted_fields(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl row 0: missing required field 'rejected' "
                                              r"\(also accepted: response_rejected, negative"):
        DPODataset(DPODatasetConfig(files=[path]), tokenizer)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "q " * 50, "chosen": "a", "rejected": "b"}])
    assert len(DPODataset(DPODatasetConfig(files=[long], max_length=20), tokenizer)) == 0
    with pytest.raises(DataFormatError, match="max_length 20"):
        DPODataset(DPODatasetConfig(files=[long], max_length=20, filter_overlong=False), tokenizer)


def test_dpo_empty_prompt_is_refused_or_skipped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
                                                   {"prompt": [{"role": "user", "content": "  "}], "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl row 1: field 'prompt' is an empty prompt"):
        DPODataset(DPODatasetConfig(files=[path]), tokenizer)
    ds = DPODataset(DPODatasetConfig(files=[path], skip_invalid_rows=True), tokenizer)
    assert len(ds) == 1 and ds.num_invalid == 1 and ds[0].messages[0]["content"] == "Capital of France?"


def test_sft_skip_invalid_rows_skips_and_counts(tmp_path, tokenizer):
    no_reply = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "conv.jsonl", [{"messages": no_reply}, {"messages": CONVERSATION}])
    with pytest.raises(DataFormatError, match=r"conv\.jsonl row 0: 'messages' has no assistant message"):
        SFTDataset(SFTDatasetConfig(files=[path]), tokenizer)
    path = write_jsonl(tmp_path / "conv.jsonl", [{"messages": no_reply}, {"messages": CONVERSATION}, {"other": 1}])
    ds = SFTDataset(SFTDatasetConfig(files=[path], skip_invalid_rows=True), tokenizer)
    assert len(ds) == 1 and ds.num_invalid == 2
