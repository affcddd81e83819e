"""The CPU demo's verifiable task: single-digit arithmetic ("What is 3 + 5?" → "8"), in verl's schema.

Answers are never negative (a - b is drawn with a ≥ b), so the answer is always a plain number the
tiny demo tokenizer has seen. Scored by the "synthetic_arith" reward (data_source "synthetic/arith").
"""

from __future__ import annotations

import random

ARITH_DATA_SOURCE = "synthetic/arith"
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arith_records(num_samples: int, seed: int = 0, ops: tuple[str, ...] = ("+", "-"), max_operand: int = 9,
                  split: str = "train") -> list[dict]:
    """``num_samples`` verl-schema rows; the same (seed, arguments) always give the same rows."""
    unknown = [op for op in ops if op not in _OPS]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {ops}")
    rng = random.Random(seed)
    records = []
    for index in range(num_samples):
        op = rng.choice(ops)
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and a < b:
            a, b = b, a
        question = f"What is {a} {op} {b}?"
        answer = _OPS[op](a, b)
        records.append({
            "data_source": ARITH_DATA_SOURCE,
            "prompt": [{"role": "user", "content": question}],
            "ability": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": str(answer)},
            "extra_info": {"split": split, "index": index, "question": question, "answer": str(answer)},
        })
    return records
