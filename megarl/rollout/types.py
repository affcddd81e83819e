"""Data types of the rollout interface: requests, sampling options, per-sample results.

Token ids are plain `list[int]`; log-probs are `list[float]` in nats, one per generated token.
Which distribution the log-probs come from is an engine setting (`logprobs_mode`, see
`megarl.rollout.vllm_engine.VLLMEngineConfig`), not a per-request option: the trainer must know it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

Message = dict[str, Any]  # {"role": "user"|"assistant"|"system"|"tool", "content": str, ...}

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample. `top_k=0` and `top_p=1.0` disable those filters; `temperature=0` is greedy.

    `seed` makes one request reproducible (its n samples still differ from each other).
    `stop` are strings that end a sample (not included in the token ids unless generated as a
    stop token); `stop_token_ids` end a sample and are included.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingOptions.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingOptions.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingOptions.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingOptions.top_k must be 0 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingOptions.max_tokens must be >= 1, got {self.max_tokens}")
        # Accept lists from YAML / JSON but store tuples (hashable, immutable).
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def from_config(cls, rollout, *, validation: bool = False) -> "SamplingOptions":
        """From megarl.config's RolloutConfig (its top_k=-1 "off" is vLLM's, here 0); `validation`:
        greedy pass@1 (one sample, temperature 0) with the same length limit."""
        if validation:
            return cls(n=1, temperature=0.0, max_tokens=rollout.max_new_tokens)
        return cls(n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=max(rollout.top_k, 0),
                   max_tokens=rollout.max_new_tokens)

    def with_(self, **changes) -> "SamplingOptions":
        return replace(self, **changes)


@dataclass
class RolloutRequest:
    """One prompt: chat `messages` (the engine applies the tokenizer's chat template with a
    generation prompt) or `prompt_token_ids` (used as they are). When both are given the engine sees
    `prompt_token_ids` and `messages` is carried along as the conversation so far (multi-turn).
    `sampling` overrides the batch's options for this request; `metadata` travels untouched to the
    results (e.g. the reward label).
    """

    messages: list[Message] | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingOptions | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.messages is None and self.prompt_token_ids is None:
            raise ValueError("RolloutRequest needs `messages` or `prompt_token_ids`")
        if self.messages is not None:
            if not self.messages or not all(isinstance(m, dict) and "role" in m for m in self.messages):
                raise ValueError("RolloutRequest.messages must be a non-empty list of {'role', 'content'} dicts")
        if self.prompt_token_ids is not None:
            if not self.prompt_token_ids:
                raise ValueError("RolloutRequest.prompt_token_ids must not be empty")
            self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]


@dataclass
class SampleResult:
    """One generated sample.

    `token_ids` are the generated tokens only (`[response_len]`); `logprobs[i]` is the engine's
    log-prob (nats) of `token_ids[i]` given the prompt and `token_ids[:i]`. `messages` is the
    request's messages plus the assistant message (`[{"role": "assistant", "content": text}]` alone
    for token-id requests). `finish_reason` is "stop" (eos / stop string / stop token), "length"
    (max_tokens or the model's context) or "abort".
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    messages: list[Message]
    stop_reason: int | str | None = None
    request_index: int = 0
    sample_index: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.token_ids


@dataclass
class EngineHealth:
    """What `health()` reports. `weights_version` counts completed weight pushes (0 = checkpoint)."""

    ok: bool
    engine_index: int
    model: str
    weights_version: int
    tensor_parallel_size: int
    sleeping: bool
    pid: int
    detail: str = ""
