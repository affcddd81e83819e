"""Synthetic single-digit arithmetic ("What is 3 + 5?"), for the CPU demos and tests:

- `arith_records`: RL prompts in verl's schema, answer "8", scored by the "synthetic_arith" reward
  (data_source "synthetic/arith");
- `sft_arith_records`: SFT conversations whose assistant answers in a fixed format, "<answer>8</answer>"
  (`ANSWER_FORMAT` matches it);
- `preference_arith_records`: DPO pairs preferring that format (or the right sum) to another reply.

Answers are never negative (a - b is drawn with a ≥ b), so the answer is always a plain number the
tiny demo tokenizer has seen.
"""

from __future__ import annotations

import random
import re

ARITH_DATA_SOURCE = "synthetic/arith"
ANSWER_FORMAT = re.compile(r"^<answer>\d+</answer>$")
REJECTED_STYLES = ("plain", "wrong")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _check_ops(ops) -> None:
    unknown = [op for op in ops if op not in _OPS]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {ops}")


def _question(rng: random.Random, ops, max_operand: int) -> tuple[str, int]:
    op = rng.choice(ops)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-" and a < b:
        a, b = b, a
    return f"What is {a} {op} {b}?", _OPS[op](a, b)


def arith_records(num_samples: int, seed: int = 0, ops: tuple[str, ...] = ("+", "-"), max_operand: int = 9,
                  split: str = "train") -> list[dict]:
    """``num_samples`` verl-schema rows; the same (seed, arguments) always give the same rows."""
    _check_ops(ops)
    rng = random.Random(seed)
    records = []
    for index in range(num_samples):
        question, answer = _question(rng, ops, max_operand)
        records.append({
            "data_source": ARITH_DATA_SOURCE,
            "prompt": [{"role": "user", "content": question}],
            "ability": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": str(answer)},
            "extra_info": {"split": split, "index": index, "question": question, "answer": str(answer)},
        })
    return records


def sft_arith_records(num_samples: int, seed: int = 0, ops: tuple[str, ...] = ("+", "-"), max_operand: int = 9,
                      system_prompt: str | None = None) -> list[dict]:
    """``num_samples`` rows ``{"messages": [(system), user, assistant]}``; the assistant answers
    "<answer>N</answer>". Deterministic in (seed, arguments)."""
    _check_ops(ops)
    rng = random.Random(seed)
    records = []
    for _ in range(num_samples):
        question, answer = _question(rng, ops, max_operand)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": f"<answer>{answer}</answer>"}]
        records.append({"messages": messages})
    return records


def preference_arith_records(num_samples: int, seed: int = 0, ops: tuple[str, ...] = ("+", "-"),
                             max_operand: int = 9, rejected: str = "plain") -> list[dict]:
    """``num_samples`` DPO rows ``{"prompt": [user], "chosen": "<answer>N</answer>", "rejected": ...}``.

    rejected="plain": the right number without the tags ("N"), a style preference;
    rejected="wrong": a wrong number in the tags ("<answer>M</answer>", M != N), a correctness one.
    """
    _check_ops(ops)
    if rejected not in REJECTED_STYLES:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED_STYLES)}, got {rejected!r}")
    rng = random.Random(seed)
    wrong_rng = random.Random(f"wrong answers {seed}")  # its own stream: both styles ask the same questions
    records = []
    for _ in range(num_samples):
        question, answer = _question(rng, ops, max_operand)
        if rejected == "plain":
            worse = str(answer)
        else:
            wrong = answer + wrong_rng.choice([d for d in range(-3, 4) if d and answer + d >= 0])
            worse = f"<answer>{wrong}</answer>"
        records.append({"prompt": [{"role": "user", "content": question}], "chosen": f"<answer>{answer}</answer>",
                        "rejected": worse})
    return records
