"""Tiny random-weight HuggingFace checkpoints and a locally trained tokenizer, for tests and the demo.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a small built-in corpus, with
a ChatML chat template (the one Qwen models use). Models are fp32 with head_dim 32, which the vLLM CPU
attention supports (it accepts only some head sizes: 32, 64, 80, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough varied text for BPE merges that cover chat, arithmetic and reasoning-tag vocabulary.
_CORPUS = """
The quick brown fox jumps over the lazy dog. What is 2 + 2? The answer is 4.
Solve the equation x + 3 = 7. Therefore x = 4. Let us think step by step.
Reinforcement learning from human feedback trains a policy with rewards.
Group relative policy optimization samples several completions per prompt.
The user asks a question and the assistant answers it politely and correctly.
<think> reasoning </think> <answer> 42 </answer> \\boxed{12} #### 7
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.
What is 3 + 5? What is 9 - 4? What is 6 * 7? Compute 8 + 1. Answer:
def add(a, b):\n    return a + b\nprint(add(1, 2))\n
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny checkpoint. The defaults give ~100k parameters."""

    arch: str = "qwen3_moe"  # qwen3_moe | qwen3 | qwen2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 128
    num_experts: int = 4
    experts_per_token: int = 2
    moe_intermediate_size: int = 32
    init_std: float = 0.2  # larger than usual so random models give non-trivial distributions
    seed: int = 0


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML specials, trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS * 20], trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok


def build_config(spec: TinyModelSpec, tokenizer):
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if spec.arch == "qwen2":
        # Qwen2 has no head_dim field: head_dim = hidden / heads.
        heads = spec.hidden_size // spec.head_dim
        return Qwen2Config(**{**common, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2)})
    if spec.arch == "qwen3":
        return Qwen3Config(**common, head_dim=spec.head_dim)
    if spec.arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            head_dim=spec.head_dim,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.moe_intermediate_size,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            mlp_only_layers=[],
        )
    raise ValueError(f"unknown tiny model arch {spec.arch!r}; choose qwen3_moe, qwen3 or qwen2")


def write_tiny_model(out_dir: str, spec: TinyModelSpec = TinyModelSpec(), tokenizer=None) -> str:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files to out_dir."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = tokenizer or build_tokenizer()
    config = build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, spec.init_std)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=True
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_tiny_model_set(root: str) -> dict[str, str]:
    """The three tiny models the tests use, sharing one tokenizer: {arch: folder}."""
    tokenizer = build_tokenizer()
    return {
        arch: write_tiny_model(os.path.join(root, arch), TinyModelSpec(arch=arch), tokenizer)
        for arch in ("qwen3_moe", "qwen3", "qwen2")
    }
