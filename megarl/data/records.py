"""Reading verl-style record files (parquet, JSONL, JSON) and checking their fields.

Every check raises DataFormatError naming the file, the row and the field, and runs before any
tokenisation, so a malformed dataset fails at start-up rather than hours into a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Sequence

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("error", "left", "right")


class DataFormatError(ValueError):
    """A dataset file lacks a field or has a malformed value."""


SKIP_OPTION = "data.skip_invalid_rows"


class InvalidRows:
    """What a dataset does with a row that fails its checks: stop at the first, naming the file and
    row (default), or skip it and count it (`data.skip_invalid_rows`). Wrap each row's checks in
    `with invalid.guard():`; a skipped row's code after the failing check does not run."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.reasons: list[str] = []

    @property
    def count(self) -> int:
        return len(self.reasons)

    @contextlib.contextmanager
    def guard(self):
        try:
            yield
        except DataFormatError as err:
            if not self.skip:
                raise DataFormatError(f"{err} (or set {SKIP_OPTION}=true to skip such rows and count them)") from err
            self.reasons.append(str(err))

    def report(self, what: str, total: int) -> None:
        """One warning with the count and the first reasons (nothing when no row was skipped)."""
        if self.reasons:
            shown = "; ".join(self.reasons[:3]) + ("; ..." if len(self.reasons) > 3 else "")
            logger.warning("skipped %d of %d %s as invalid (%s=true): %s", self.count, total, what, SKIP_OPTION, shown)


def check_prompt_not_empty(messages: list[dict], field_name: str, where: str) -> None:
    """A prompt whose every message is empty (or only whitespace) gives the model nothing to answer."""
    if not any(m["content"].strip() for m in messages):
        raise DataFormatError(f"{where}: field {field_name!r} is an empty prompt (no message has any text)")


def read_records(path: str, required_columns: Sequence[str] = (), invalid: InvalidRows | None = None) -> list[dict | None]:
    """All rows of a .parquet, .jsonl or .json (list of objects) file as dicts.

    required_columns: top-level fields every file must have; checked on the parquet schema (before the
    rows are read) or on every JSON row. A JSON row that fails them is an error, or (with `invalid`
    skipping) is counted there and returned as None, so row numbers stay those of the file.
    """
    if not os.path.isfile(path):
        raise DataFormatError(f"dataset file {path!r} does not exist")
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        missing = [name for name in required_columns if name not in columns]
        if missing:
            raise DataFormatError(f"{path}: missing required field {missing[0]!r} (columns: {', '.join(columns)})")
        return pq.read_table(path).to_pylist()
    if lower.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataFormatError(f"{path}:{line_no}: not valid JSON: {exc}") from exc
    elif lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise DataFormatError(f"{path}: a .json dataset must hold a list of objects")
    else:
        raise DataFormatError(f"{path}: unsupported dataset format; use .parquet, .jsonl or .json")
    checked: list[dict | None] = []
    for row_index, row in enumerate(rows):
        checked.append(None)
        with invalid.guard() if invalid is not None else contextlib.nullcontext():
            _check_json_row(row, required_columns, path, row_index)
            checked[-1] = row
    return checked


def _check_json_row(row: Any, required_columns: Sequence[str], path: str, row_index: int) -> None:
    if not isinstance(row, dict):
        raise DataFormatError(f"{path} row {row_index}: expected an object, got {type(row).__name__}")
    for name in required_columns:
        if name not in row:
            raise DataFormatError(f"{path} row {row_index}: missing required field {name!r} "
                                  f"(fields: {', '.join(row)})")


def get_field(record: dict, dotted: str, path: str, row: int, *, allow_none: bool = False) -> Any:
    """``record["a"]["b"]`` for ``dotted="a.b"``; DataFormatError if absent (or None unless allow_none)."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataFormatError(f"{path} row {row}: missing required field {dotted!r}")
        value = value[part]
    if value is None and not allow_none:
        raise DataFormatError(f"{path} row {row}: required field {dotted!r} is null")
    return value


def first_present(record: dict, aliases: Sequence[str], path: str, row: int) -> Any:
    """The value of the first alias present and non-null; the error lists all accepted names."""
    for name in aliases:
        if record.get(name) is not None:
            return record[name]
    raise DataFormatError(f"{path} row {row}: missing required field {aliases[0]!r} "
                          f"(also accepted: {', '.join(aliases[1:])}; fields present: {', '.join(record)})")


def to_messages(value: Any, field_name: str, path: str, row: int) -> list[dict]:
    """A list of {"role", "content"} chat messages; a plain string becomes one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written parquet
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{path} row {row}: field {field_name!r} must be a non-empty list of chat messages "
                              f"or a string, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataFormatError(f"{path} row {row}: {field_name}[{i}] must be a message with string 'role' "
                                  f"and 'content', got {message!r}")
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def check_truncation(mode: str) -> None:
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")


def limit_length(ids: list[int], max_length: int, truncation: str, where: str) -> list[int]:
    """Cut ``ids`` to ``max_length``: keep the end ("left" truncation), the start ("right"), or raise."""
    if len(ids) <= max_length:
        return ids
    if truncation == "left":
        return ids[-max_length:]
    if truncation == "right":
        return ids[:max_length]
    raise DataFormatError(f"{where}: {len(ids)} tokens > max length {max_length}; set truncation to left or "
                          "right, enable filtering of overlong samples, or raise the limit")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, chat_template_kwargs: dict) -> str:
    """The chat template applied to ``messages`` as text (tokenise with add_special_tokens=False)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; datasets of chat messages need one")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **chat_template_kwargs)


def write_records(records: list[dict], path: str) -> None:
    """Write rows to .parquet (nested dicts and lists become structs and lists) or .jsonl."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif lower.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"{path}: write .parquet or .jsonl")
