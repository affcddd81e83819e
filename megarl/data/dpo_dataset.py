"""Preference pairs for DPO: prompt / chosen / rejected, under the names common datasets use.

Accepted field names (first present wins): prompt | question | query; chosen | response_chosen |
answer; rejected | response_rejected | negative. The prompt is a string or a list of chat messages;
a response is a string or a list of messages (its last assistant message is the response).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from megarl.data.chat_tokens import tokenize_response
from megarl.data.records import (
    DataFormatError, InvalidRows, check_prompt_not_empty, first_present, read_records, to_messages,
)

logger = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "question", "query")
CHOSEN_FIELDS = ("chosen", "response_chosen", "answer")
REJECTED_FIELDS = ("rejected", "response_rejected", "negative")


@dataclass
class DPODatasetConfig:
    """max_length bounds prompt + longer response, in tokens; longer pairs are dropped when
    filter_overlong, else they are an error. A malformed row (missing field, empty prompt) is an error
    naming the row, or skipped and counted when skip_invalid_rows."""

    files: list[str] = field(default_factory=list)
    max_length: int = 2048
    filter_overlong: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    skip_invalid_rows: bool = False

    @classmethod
    def from_config(cls, dpo, data, files) -> "DPODatasetConfig":
        """From megarl.config's DPOConfig (and DataConfig's skip_invalid_rows), for `files` (pairs
        longer than max_length are dropped)."""
        return cls(files=list(files), max_length=dpo.max_length, skip_invalid_rows=data.skip_invalid_rows)


@dataclass
class PreferenceSample:
    """prompt_ids: templated prompt with generation prompt; chosen_ids / rejected_ids: the response
    tokens that follow it (end-of-turn marker included)."""

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    messages: list[dict]


def _response_text(value: Any, field_name: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        for message in reversed(value):
            if isinstance(message, dict) and message.get("role") == "assistant" and isinstance(message.get("content"), str):
                return message["content"]
    raise DataFormatError(f"{where}: field {field_name!r} must be a string or messages with an assistant reply")


class DPODataset:
    def __init__(self, config: DPODatasetConfig, tokenizer):
        if not config.files:
            raise ValueError("DPO dataset files are empty")
        pairs, total = [], 0
        invalid = InvalidRows(config.skip_invalid_rows)
        for path in config.files:  # every row is checked before any is tokenised
            for row, record in enumerate(read_records(path, (), invalid)):
                total += 1
                if record is None:
                    continue
                where = f"{path} row {row}"
                with invalid.guard():
                    messages = to_messages(first_present(record, PROMPT_FIELDS, path, row), "prompt", path, row)
                    check_prompt_not_empty(messages, "prompt", where)
                    chosen = _response_text(first_present(record, CHOSEN_FIELDS, path, row), "chosen", where)
                    rejected = _response_text(first_present(record, REJECTED_FIELDS, path, row), "rejected", where)
                    pairs.append((messages, chosen, rejected, where))
        invalid.report("preference pairs", total)
        self.num_invalid = invalid.count
        self.samples: list[PreferenceSample] = []
        self.num_filtered = 0
        for messages, chosen, rejected, where in pairs:
            prompt_ids, chosen_ids = tokenize_response(tokenizer, messages, chosen, config.chat_template_kwargs, where)
            _, rejected_ids = tokenize_response(tokenizer, messages, rejected, config.chat_template_kwargs, where)
            length = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
            if length > config.max_length:
                if not config.filter_overlong:
                    raise DataFormatError(f"{where}: {length} tokens > max_length {config.max_length}")
                self.num_filtered += 1
                continue
            self.samples.append(PreferenceSample(len(self.samples), prompt_ids, chosen_ids, rejected_ids, messages))
        if self.num_filtered:
            logger.info("dropped %d preference pairs longer than %d tokens", self.num_filtered, config.max_length)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> PreferenceSample:
        return self.samples[index]
