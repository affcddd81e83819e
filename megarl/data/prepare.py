"""Question/answer rows (GSM8K or MATH style) → verl-schema RL rows. Used by tools/prepare_data.py."""

from __future__ import annotations

import re

from megarl.data.records import DataFormatError

STYLES = ("gsm8k", "math")
# The instructions verl's example preprocessing appends, so prompts match what users trained with.
INSTRUCTIONS = {
    "gsm8k": "Let's think step by step and output the final answer after \"####\".",
    "math": "Let's think step by step and output the final answer within \\boxed{}.",
}
DATA_SOURCES = {"gsm8k": "openai/gsm8k", "math": "DigitalLearningGmbH/MATH-lighteval"}
QUESTION_KEYS = ("question", "problem", "query", "prompt")
ANSWER_KEYS = ("answer", "solution", "response")

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_ground_truth(answer: str) -> str | None:
    """"... #### 1,234" → "1234"."""
    match = _GSM8K_FINAL.search(answer)
    return match.group(1).replace(",", "").replace("$", "").strip() if match else None


def math_ground_truth(answer: str) -> str | None:
    """The last \\boxed{} of a worked solution, or the answer itself if it has no \\boxed."""
    from megarl.rewards.math_rewards import last_boxed_content

    if "\\boxed" in answer:
        return last_boxed_content(answer)
    return answer.strip() or None


def detect_style(answer: str) -> str | None:
    if "####" in answer:
        return "gsm8k"
    if "\\boxed" in answer:
        return "math"
    return None


def _pick(record: dict, key: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    names = (key,) if key else candidates
    for name in names:
        if isinstance(record.get(name), str):
            return record[name]
    raise DataFormatError(f"{where}: missing required field {names[0]!r} for the {what}"
                          + ("" if key else f" (also accepted: {', '.join(names[1:])})"))


def qa_to_rl_records(rows: list[dict], source_name: str, style: str = "auto", split: str = "train",
                     question_key: str | None = None, answer_key: str | None = None, data_source: str | None = None,
                     instruction: str | None = None) -> list[dict]:
    """Convert every row; an unparseable answer is an error naming the file and row (no silent drops)."""
    if style not in STYLES + ("auto",):
        raise ValueError(f"style must be gsm8k, math or auto, got {style!r}")
    records = []
    for index, row in enumerate(rows):
        where = f"{source_name} row {index}"
        question = _pick(row, question_key, QUESTION_KEYS, "question", where)
        answer = _pick(row, answer_key, ANSWER_KEYS, "answer", where)
        row_style = detect_style(answer) if style == "auto" else style
        if row_style is None:
            raise DataFormatError(f"{where}: cannot tell the answer style (no '####' and no \\boxed); pass --style")
        ground_truth = gsm8k_ground_truth(answer) if row_style == "gsm8k" else math_ground_truth(answer)
        if not ground_truth:
            marker = "'#### <answer>'" if row_style == "gsm8k" else "\\boxed{<answer>}"
            raise DataFormatError(f"{where}: no final answer found; a {row_style} answer needs {marker}")
        suffix = INSTRUCTIONS[row_style] if instruction is None else instruction
        content = f"{question} {suffix}".strip() if suffix else question
        records.append({
            "data_source": data_source or DATA_SOURCES[row_style],
            "prompt": [{"role": "user", "content": content}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ground_truth},
            "extra_info": {"split": split, "index": index, "question": question, "answer": answer},
        })
    return records
