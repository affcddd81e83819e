"""SFT conversations: rows with a ``messages`` list (system/user/assistant/tool turns)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from megarl.data.chat_tokens import tokenize_conversation
from megarl.data.records import (
    DataFormatError, InvalidRows, check_truncation, get_field, limit_length, read_records, to_messages,
)

logger = logging.getLogger(__name__)


@dataclass
class SFTDatasetConfig:
    """max_length in tokens after the chat template. Longer conversations are dropped when
    filter_overlong, else cut by ``truncation`` (error | left | right). A malformed row (no assistant
    message, missing or malformed messages) is an error naming the row, or skipped and counted when
    skip_invalid_rows."""

    files: list[str] = field(default_factory=list)
    messages_key: str = "messages"
    max_length: int = 2048
    filter_overlong: bool = True
    truncation: str = "error"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    skip_invalid_rows: bool = False

    @classmethod
    def from_config(cls, sft, data, files) -> "SFTDatasetConfig":
        """From megarl.config's SFTConfig (and DataConfig's skip_invalid_rows), for `files`."""
        return cls(files=list(files), messages_key=sft.messages_key, max_length=sft.max_length,
                   filter_overlong=sft.filter_overlong, truncation=sft.truncation,
                   skip_invalid_rows=data.skip_invalid_rows)


@dataclass
class SFTSample:
    """input_ids [seq]; loss_mask [seq]: 1 on assistant tokens (what SFT trains on)."""

    index: int
    input_ids: list[int]
    loss_mask: list[int]


class SFTDataset:
    def __init__(self, config: SFTDatasetConfig, tokenizer):
        if not config.files:
            raise ValueError("SFT dataset files are empty")
        check_truncation(config.truncation)
        conversations, total = [], 0
        invalid = InvalidRows(config.skip_invalid_rows)
        for path in config.files:  # every row is checked before any is tokenised
            for row, record in enumerate(read_records(path, (config.messages_key,), invalid)):
                total += 1
                if record is None:
                    continue
                with invalid.guard():
                    messages = to_messages(get_field(record, config.messages_key, path, row), config.messages_key,
                                           path, row)
                    if not any(m["role"] == "assistant" for m in messages):
                        raise DataFormatError(f"{path} row {row}: {config.messages_key!r} has no assistant message")
                    conversations.append((messages, f"{path} row {row}"))
        invalid.report("conversations", total)
        self.num_invalid = invalid.count
        self.samples: list[SFTSample] = []
        self.num_filtered = 0
        for messages, where in conversations:
            ids, mask = tokenize_conversation(tokenizer, messages, config.chat_template_kwargs, where)
            if len(ids) > config.max_length and config.filter_overlong:
                self.num_filtered += 1
                continue
            kept = limit_length(list(range(len(ids))), config.max_length, config.truncation, where)
            self.samples.append(SFTSample(len(self.samples), [ids[k] for k in kept], [mask[k] for k in kept]))
        if self.num_filtered:
            logger.info("dropped %d conversations longer than %d tokens", self.num_filtered, config.max_length)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> SFTSample:
        return self.samples[index]
