"""Prompt datasets for RL in verl's schema.

Each row (parquet or JSONL) holds:
    data_source:   str, selects the reward ("openai/gsm8k", "synthetic/arith", ...)
    prompt:        list of chat messages [{"role": "user", "content": ...}] (a plain string is accepted
                   as one user message); the column name is ``prompt_key``
    ability:       str, optional ("math")
    reward_model:  {"style": "rule", "ground_truth": ...}
    extra_info:    dict, optional (verl writes split, index, question, answer); passed to the reward

Prompts are rendered with the model tokenizer's chat template with the generation prompt added, and
tokenised without extra special tokens (the template already has them), as verl does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megarl.data.records import (
    DataFormatError,
    InvalidRows,
    check_prompt_not_empty,
    check_truncation,
    get_field,
    limit_length,
    read_records,
    render_chat,
    to_messages,
)

logger = logging.getLogger(__name__)


@dataclass
class RLDatasetConfig:
    """files: parquet/JSONL paths, concatenated in order. max_prompt_length is in tokens, after the
    chat template. filter_overlong_prompts drops longer prompts; otherwise ``truncation`` applies:
    "error" (fail at load, naming the file and row), "left" (keep the end) or "right" (keep the start).
    chat_template_kwargs go to apply_chat_template (e.g. {"enable_thinking": False} for Qwen3).
    max_samples keeps only the first N rows (after filtering); None keeps all. A row that fails its
    checks (missing or malformed field, empty prompt) stops loading with the file and row number,
    or is skipped and counted when skip_invalid_rows."""

    files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    max_prompt_length: int = 1024
    filter_overlong_prompts: bool = True
    truncation: str = "error"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_samples: int | None = None
    skip_invalid_rows: bool = False

    @classmethod
    def from_config(cls, data, files) -> "RLDatasetConfig":
        """From megarl.config's DataConfig, for `files` (data.train_files or data.val_files)."""
        return cls(files=list(files), prompt_key=data.prompt_key, max_prompt_length=data.max_prompt_length,
                   filter_overlong_prompts=data.filter_overlong_prompts, truncation=data.truncation,
                   skip_invalid_rows=data.skip_invalid_rows)

    def validate(self) -> None:
        if not self.files:
            raise ValueError("data.files is empty: give at least one parquet or JSONL file")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be ≥ 1, got {self.max_prompt_length}")
        check_truncation(self.truncation)


@dataclass
class PromptSample:
    """One prompt. prompt_ids: token ids of the templated prompt (generation prompt included), at most
    max_prompt_length long. messages: the raw chat (before templating and truncation)."""

    index: int
    prompt_ids: list[int]
    messages: list[dict]
    data_source: str
    ground_truth: Any
    ability: str = ""
    reward_style: str = "rule"
    extra_info: dict = field(default_factory=dict)


class RLDataset:
    """Validated, tokenised prompts. ``len(ds)``, ``ds[i] -> PromptSample``.

    All rows of all files are checked before anything is tokenised; token ids are kept in one flat
    int32 array (a million prompts stay cheap in memory).
    """

    def __init__(self, config: RLDatasetConfig, tokenizer):
        config.validate()
        self.config = config
        rows, origins, invalid = self._read_and_check(config)
        texts = [render_chat(tokenizer, row["messages"], True, config.chat_template_kwargs) for row in rows]
        token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

        kept_rows, kept_ids, dropped = [], [], 0
        for row, ids, (path, row_index) in zip(rows, token_ids, origins):
            if len(ids) > config.max_prompt_length and config.filter_overlong_prompts:
                dropped += 1
                continue
            ids = limit_length(ids, config.max_prompt_length, config.truncation, f"{path} row {row_index} prompt")
            kept_rows.append(row)
            kept_ids.append(ids)
        if dropped:
            logger.info("dropped %d of %d prompts longer than %d tokens", dropped, len(rows), config.max_prompt_length)
        if config.max_samples is not None:
            kept_rows, kept_ids = kept_rows[:config.max_samples], kept_ids[:config.max_samples]
        if not kept_rows:
            raise DataFormatError(f"no prompts left in {config.files} (read {len(rows)} valid rows, skipped "
                                  f"{invalid.count} invalid ones, dropped {dropped} as longer than "
                                  f"max_prompt_length={config.max_prompt_length})")
        self.num_filtered = dropped
        self.num_invalid = invalid.count
        self.num_read = len(rows)
        self._rows = kept_rows
        lengths = np.array([len(ids) for ids in kept_ids], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._flat_ids = np.fromiter((t for ids in kept_ids for t in ids), dtype=np.int32, count=int(lengths.sum()))

    @staticmethod
    def _read_and_check(config: RLDatasetConfig) -> tuple[list[dict], list[tuple[str, int]], InvalidRows]:
        required = (config.prompt_key, "data_source", "reward_model")
        invalid = InvalidRows(config.skip_invalid_rows)
        rows, origins, total = [], [], 0
        for path in config.files:
            for row_index, record in enumerate(read_records(path, required, invalid)):
                total += 1
                if record is None:  # skipped (and counted) by read_records
                    continue
                with invalid.guard():
                    rows.append(_checked_row(record, config.prompt_key, path, row_index))
                    origins.append((path, row_index))
        invalid.report("prompt rows", total)
        return rows, origins, invalid

    def data_sources(self) -> set[str]:
        """The distinct data_source values (which select the reward)."""
        return {row["data_source"] for row in self._rows}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> PromptSample:
        if not 0 <= index < len(self._rows):
            raise IndexError(f"prompt index {index} out of range [0, {len(self._rows)})")
        row = self._rows[index]
        ids = self._flat_ids[self._offsets[index]:self._offsets[index + 1]].tolist()
        return PromptSample(index=index, prompt_ids=ids, messages=row["messages"], data_source=row["data_source"],
                            ground_truth=row["ground_truth"], ability=row["ability"],
                            reward_style=row["reward_style"], extra_info=dict(row["extra_info"]))


def _checked_row(record: dict, prompt_key: str, path: str, row_index: int) -> dict:
    """One row's fields, checked (DataFormatError naming the file, row and field)."""
    reward_model = get_field(record, "reward_model", path, row_index)
    if not isinstance(reward_model, dict):
        raise DataFormatError(f"{path} row {row_index}: field 'reward_model' must be a dict with "
                              f"'ground_truth', got {type(reward_model).__name__}")
    ground_truth = get_field(record, "reward_model.ground_truth", path, row_index, allow_none=True)
    data_source = get_field(record, "data_source", path, row_index)
    if not isinstance(data_source, str):
        raise DataFormatError(f"{path} row {row_index}: field 'data_source' must be a string")
    extra_info = record.get("extra_info") or {}
    if not isinstance(extra_info, dict):
        raise DataFormatError(f"{path} row {row_index}: field 'extra_info' must be a dict")
    messages = to_messages(get_field(record, prompt_key, path, row_index), prompt_key, path, row_index)
    check_prompt_not_empty(messages, prompt_key, f"{path} row {row_index}")
    return {
        "messages": messages,
        "data_source": data_source,
        "ground_truth": ground_truth,
        "ability": record.get("ability") or "",
        "reward_style": reward_model.get("style") or "rule",
        "extra_info": extra_info,
    }
