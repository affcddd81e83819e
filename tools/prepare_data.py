"""Write datasets in verl's parquet schema: RL prompts, SFT conversations, DPO preference pairs.

From a local JSONL of question/answer pairs (GSM8K answers end with "#### <answer>", MATH solutions
contain \\boxed{<answer>}):

    python tools/prepare_data.py --input gsm8k_train.jsonl --output data/gsm8k/train.parquet --style gsm8k

The CPU demo's synthetic arithmetic task:

    python tools/prepare_data.py --synthetic-arith 2000 --output data/arith/train.parquet --seed 0

Synthetic SFT conversations ("What is 3 + 5?" -> "<answer>8</answer>") and DPO pairs (chosen
"<answer>8</answer>", rejected "8", or with --rejected wrong "<answer>M</answer>", M a wrong sum):

    python tools/prepare_data.py --synthetic-sft 2000 --output data/sft/train.parquet
    python tools/prepare_data.py --synthetic-dpo 2000 --output data/dpo/train.parquet --rejected plain
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megarl.data.prepare import qa_to_rl_records  # noqa: E402
from megarl.data.records import read_records, write_records  # noqa: E402
from megarl.data.synthetic import (  # noqa: E402
    REJECTED_STYLES,
    arith_records,
    preference_arith_records,
    sft_arith_records,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="JSONL (or parquet/JSON) of question/answer rows")
    source.add_argument("--synthetic-arith", type=int, metavar="N", help="generate N arithmetic prompts instead")
    source.add_argument("--synthetic-sft", type=int, metavar="N", help="generate N SFT arithmetic conversations")
    source.add_argument("--synthetic-dpo", type=int, metavar="N", help="generate N DPO arithmetic preference pairs")
    parser.add_argument("--output", required=True, help=".parquet (verl's format) or .jsonl")
    parser.add_argument("--style", default="auto", choices=["auto", "gsm8k", "math"])
    parser.add_argument("--question-key", help="default: question | problem | query | prompt")
    parser.add_argument("--answer-key", help="default: answer | solution | response")
    parser.add_argument("--data-source", help="default: openai/gsm8k or DigitalLearningGmbH/MATH-lighteval")
    parser.add_argument("--instruction", help="text appended to each question (default: verl's per style; '' for none)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data only")
    parser.add_argument("--ops", default="+,-", help="synthetic data only: comma-separated subset of + - *")
    parser.add_argument("--max-operand", type=int, default=9, help="synthetic data only")
    parser.add_argument("--rejected", default="plain", choices=REJECTED_STYLES,
                        help="--synthetic-dpo only: what the rejected reply is (plain: the bare number; wrong: a wrong sum)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = tuple(args.ops.split(","))
    if args.synthetic_arith is not None:
        records = arith_records(args.synthetic_arith, seed=args.seed, ops=ops, max_operand=args.max_operand,
                                split=args.split)
    elif args.synthetic_sft is not None:
        records = sft_arith_records(args.synthetic_sft, seed=args.seed, ops=ops, max_operand=args.max_operand)
    elif args.synthetic_dpo is not None:
        records = preference_arith_records(args.synthetic_dpo, seed=args.seed, ops=ops, max_operand=args.max_operand,
                                           rejected=args.rejected)
    else:
        records = qa_to_rl_records(read_records(args.input), args.input, style=args.style, split=args.split,
                                   question_key=args.question_key, answer_key=args.answer_key,
                                   data_source=args.data_source, instruction=args.instruction)
    write_records(records, args.output)
    print(f"wrote {len(records)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
