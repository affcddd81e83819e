"""The critic's scalar value head, in place of the LM head of a megatron GPTModel.

A PPO critic is the actor's architecture with one output per position instead of vocabulary logits.
On the last pipeline stage `attach_value_head` replaces `GPTModel.output_layer` with `ValueHead`, a
plain `Linear(hidden, 1)` with a bias, so the model's output becomes `[b, s, 1]` values. HF stores
the same head as `score.weight` `[1, hidden]` and `score.bias` `[1]` (`*ForTokenClassification` with
`num_labels=1`, which is also how verl's and TRL's HF critics are saved), and that is the name the
head is exported and loaded under.

The head is replicated on every TP rank. Under sequence parallelism the hidden states arrive split
along the sequence, so the head first gathers them (its backward hands each rank its own slice
back, without a reduction): every TP rank then computes identical values from the full sequence and
the head's gradients are identical on all TP ranks, with no extra all-reduce.
"""

from __future__ import annotations

import torch

VALUE_HEAD_HF_NAMES = {"weight": "score.weight", "bias": "score.bias"}
# Same on every rank and every layout, so a fresh head is identical at TP1 and TP2.
_HEAD_INIT_SEED = 20240601


class ValueHead(torch.nn.Linear):
    """`[s, b, hidden]` -> `[s, b, 1]`; called as megatron calls its output layer."""

    def __init__(self, config):
        super().__init__(config.hidden_size, 1, bias=True)
        self.sequence_parallel = bool(config.sequence_parallel)  # megatron reads this attribute
        generator = torch.Generator().manual_seed(_HEAD_INIT_SEED)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * config.init_method_std)
            self.bias.zero_()

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return super().forward(hidden_states), None


def is_value_model(model) -> bool:
    return isinstance(getattr(model, "output_layer", None), ValueHead)


def attach_value_head(chunk, config) -> None:
    """Replace the LM head of a (last-stage) GPTModel chunk by a ValueHead of the chunk's dtype."""
    from megatron.core import tensor_parallel

    dtype = next(chunk.parameters()).dtype
    device = next(chunk.parameters()).device
    head = ValueHead(config).to(device=device, dtype=dtype)
    for param in head.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    chunk.output_layer = head


def hf_value_head_tensors(hf_dir: str) -> dict[str, torch.Tensor] | None:
    """`{"weight": [1, hidden], "bias": [1]}` from the folder's `score.*` tensors, or None when the
    folder holds a language model (no `score.weight`). A `score.weight` with more than one row (a
    classifier with several labels) is an error."""
    from safetensors import safe_open

    from megarl.checkpoint.convert_safetensors import hf_weight_files

    files = hf_weight_files(hf_dir)
    found: dict[str, torch.Tensor] = {}
    for key, hf_name in VALUE_HEAD_HF_NAMES.items():
        if hf_name in files:
            with safe_open(files[hf_name], framework="pt") as f:
                found[key] = f.get_tensor(hf_name)
    if "weight" not in found:
        return None
    if found["weight"].shape[0] != 1:
        raise ValueError(f"{hf_dir}: score.weight has shape {tuple(found['weight'].shape)}; a value head has one "
                         "output (num_labels=1)")
    found.setdefault("bias", torch.zeros(1, dtype=found["weight"].dtype))
    return found


def load_value_head(chunk, hf_dir: str) -> bool:
    """Copy the folder's `score.*` into the chunk's head; False (head left as initialised) when absent."""
    tensors = hf_value_head_tensors(hf_dir)
    if tensors is None:
        return False
    head = chunk.output_layer
    with torch.no_grad():
        head.weight.copy_(tensors["weight"].to(head.weight.dtype))
        head.bias.copy_(tensors["bias"].reshape(1).to(head.bias.dtype))
    return True


def value_model_config(config: dict) -> dict:
    """The HF config.json (as a dict) a critic is saved with: the same backbone as
    `*ForTokenClassification` with one label, untied (the value head never shares the embedding)."""
    arch = (config.get("architectures") or ["ForCausalLM"])[0]
    return {**config, "architectures": [arch.replace("ForCausalLM", "ForTokenClassification")],
            "tie_word_embeddings": False, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
