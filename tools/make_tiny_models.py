"""Write tiny random-weight HF checkpoints (Qwen3-MoE, Qwen3, Qwen2) with a locally trained tokenizer.

    python tools/make_tiny_models.py OUT_DIR                # all three tiny models
    python tools/make_tiny_models.py OUT_DIR --arch qwen3_moe --hidden 512 --layers 8 --experts 16
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model, write_tiny_model_set  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=["qwen3_moe", "qwen3", "qwen2"], help="write one model of this arch")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--moe-ffn", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.arch is None:
        for arch, path in write_tiny_model_set(args.out_dir).items():
            print(f"{arch}: {path}")
        return
    spec = TinyModelSpec(
        arch=args.arch, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, num_experts=args.experts, experts_per_token=args.topk,
        moe_intermediate_size=args.moe_ffn, intermediate_size=args.ffn, seed=args.seed,
    )
    print(write_tiny_model(args.out_dir, spec))


if __name__ == "__main__":
    main()
