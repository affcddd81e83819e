"""Parameter counts of a HuggingFace decoder from its config.json alone (no weights read).

Exact for the architectures listed in SUPPORTED_MODEL_TYPES (equal to `sum(p.numel())` of the
transformers model; tested against built models), and split the way the parallel layout splits them:
per layer "dense" parameters (attention, norms, router, dense MLP — sharded by TP) and "expert"
parameters (sharded by EP and ETP).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3", "qwen2", "llama", "mistral")


@dataclass(frozen=True)
class ModelStats:
    """Shape and parameter counts of one model (counts are numbers of parameters, not bytes)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    moe_layers: tuple[bool, ...]
    """moe_layers[i]: layer i has routed experts (else a dense MLP)."""
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    # ---- per-component counts ----
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Output projection; 0 when tied to the input embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def final_norm_params(self) -> int:
        return self.hidden_size

    @property
    def attention_linear_params(self) -> int:
        """q, k, v, o projections (+ q/k/v biases) of one layer: the part TP shards."""
        q_dim = self.num_attention_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        weights = self.hidden_size * (q_dim + 2 * kv_dim) + q_dim * self.hidden_size
        return weights + ((q_dim + 2 * kv_dim) if self.qkv_bias else 0)

    @property
    def layer_norm_params(self) -> int:
        """input + post-attention RMSNorm weights, plus Qwen3's per-head q/k norms (not TP-sharded)."""
        return 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down (SwiGLU)

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def expert_params(self) -> int:
        """One routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_layers > 0

    def layer_dense_params(self, layer: int) -> int:
        """Parameters of `layer` outside the routed experts."""
        mlp = self.router_params if self.moe_layers[layer] else self.dense_mlp_params
        return self.attention_linear_params + self.layer_norm_params + mlp

    def layer_expert_params(self, layer: int) -> int:
        return self.num_experts * self.expert_params if self.moe_layers[layer] else 0

    # ---- totals ----
    @property
    def total_params(self) -> int:
        layers = sum(self.layer_dense_params(i) + self.layer_expert_params(i) for i in range(self.num_layers))
        return self.embedding_params + self.lm_head_params + self.final_norm_params + layers

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: everything except the experts it is not routed to.

        The embedding and the output projection are counted (as model cards do for "activated")."""
        inactive_per_moe_layer = (self.num_experts - self.experts_per_token) * self.expert_params
        return self.total_params - self.num_moe_layers * inactive_per_moe_layer

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelStats:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by the planner; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        hidden = _require(config, "hidden_size")
        heads = _require(config, "num_attention_heads")
        layers = _require(config, "num_hidden_layers")
        head_dim = config.get("head_dim") or hidden // heads
        # transformers 5 writes `num_local_experts` where the released config.json files say `num_experts`
        num_experts = (config.get("num_experts") or config.get("num_local_experts") or 0) if model_type == "qwen3_moe" else 0
        mlp_only = set(config.get("mlp_only_layers") or [])
        step = config.get("decoder_sparse_step", 1) or 1
        moe_layers = tuple(num_experts > 0 and i not in mlp_only and (i + 1) % step == 0 for i in range(layers))
        return cls(
            model_type=model_type,
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=_require(config, "vocab_size"),
            intermediate_size=config.get("intermediate_size", 0),
            num_experts=num_experts,
            experts_per_token=config.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=config.get("moe_intermediate_size", 0) if num_experts else 0,
            moe_layers=moe_layers,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes bias on q/k/v; the others follow `attention_bias` (default off).
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
        )


def _require(config: dict, key: str):
    if key not in config:
        raise ValueError(f"model config.json has no {key!r}")
    return config[key]


def load_hf_config(model_path: str) -> dict:
    """The parsed config.json of a HuggingFace model folder (or of a config.json path)."""
    path = model_path if model_path.endswith(".json") else os.path.join(model_path, "config.json")
    with open(path) as f:
        return json.load(f)
