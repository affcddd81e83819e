"""Multi-turn rollouts: a scheduler decides, after every generated turn, whether the episode ends
and otherwise builds the next request; the driver keeps the token-level record for training.

Two modes users need:
- `NewTurnScheduler`: the environment answers with a new user message (tool result, verifier
  feedback); the chat template's tokens for closing the assistant turn, the user message and the
  next generation prompt are inserted.
- `ContinueScheduler`: the environment's text is inserted inside the assistant turn (e.g. after a
  `</code>` stop string, the execution output) and the model continues the same message.

Token record (`Trajectory`), all lists aligned with `token_ids` (`[seq_len]`):
- `loss_mask[t]` = 1 on tokens the model generated, 0 on the prompt and every environment token;
- `rollout_logprobs[t]` = the engine's log-prob (nats) of generated token t, 0 elsewhere, i.e.
  log p(token_ids[t] | token_ids[:t]) like `megarl.models.batch`.
Requests must only ever append: the driver checks that each next request starts with the previous
prompt plus the generated tokens and marks exactly the appended remainder as environment tokens.

Schedulers are registered by name (`@register_scheduler("name")`) or loaded from
"path/to/file.py:Class" / "package.module:Class" with `load_scheduler`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

from megarl.rollout.types import Message, RolloutRequest, SampleResult, SamplingOptions
from megarl.utils.registry import Registry
from megarl.utils.user_code import is_user_code_spec, load_user_object

SCHEDULERS = Registry("multi-turn scheduler", hint="(or give path/to/file.py:Class or package.module:Class)")


def register_scheduler(name: str):
    """Decorator: `@register_scheduler("name")` on a MultiTurnScheduler subclass."""
    return SCHEDULERS.register(name)


def load_scheduler(spec: str) -> type["MultiTurnScheduler"]:
    """A registered name, "file.py:Class" or "module:Class"."""
    if not is_user_code_spec(spec):
        return SCHEDULERS.get(spec)
    cls = load_user_object(spec, what="multi-turn scheduler")
    if not (isinstance(cls, type) and issubclass(cls, MultiTurnScheduler)):
        raise TypeError(f"{spec!r} is not a MultiTurnScheduler subclass")
    return cls


@dataclass
class Trajectory:
    """One finished (or running) episode. See the module docstring for the token record."""

    messages: list[Message]
    prompt_len: int
    token_ids: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    num_turns: int = 0
    finish_reason: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    finished: bool = False

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def response_loss_mask(self) -> list[int]:
        return self.loss_mask[self.prompt_len :]


class MultiTurnScheduler(ABC):
    """Per-episode turn logic. `tokenizer` is the engine model's HF tokenizer."""

    def __init__(self, tokenizer, max_turns: int = 4):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.tokenizer = tokenizer
        self.max_turns = max_turns

    def check_finished(self, request: RolloutRequest, result: SampleResult, turn: int) -> bool:
        """After turn `turn` (0-based): end the episode? Default: the model ran out of tokens
        (finish reason "length") or this was turn `max_turns - 1`."""
        return result.finish_reason == "length" or turn + 1 >= self.max_turns

    @abstractmethod
    def step(self, request: RolloutRequest, result: SampleResult, turn: int) -> RolloutRequest | None:
        """Build the next turn's request: `prompt_token_ids` must be `request`'s prompt ids +
        `result.token_ids` + the environment's tokens; `messages` the conversation so far.
        Return None to end the episode (the environment has nothing more to say)."""


def conversation_of(request: RolloutRequest) -> list[Message]:
    return copy.deepcopy(request.messages or [])


class NewTurnScheduler(MultiTurnScheduler):
    """The environment replies as a new user message. Subclasses implement `feedback`."""

    role = "user"

    @abstractmethod
    def feedback(self, messages: list[Message], result: SampleResult, turn: int) -> str | None:
        """The environment's reply to the assistant's last message (None: episode over)."""

    def step(self, request: RolloutRequest, result: SampleResult, turn: int) -> RolloutRequest | None:
        messages = conversation_of(request) + [{"role": "assistant", "content": result.text}]
        reply = self.feedback(messages, result, turn)
        if reply is None:
            return None
        new = [{"role": self.role, "content": reply}]
        env_ids = chat_turn_token_ids(self.tokenizer, messages, new, result.token_ids)
        return replace(request, messages=messages + new, prompt_token_ids=result.all_token_ids + env_ids)


class ContinueScheduler(MultiTurnScheduler):
    """The environment's text is inserted inside the assistant turn and the model continues it.
    Subclasses implement `insertion` (typically triggered by a stop string in SamplingOptions)."""

    @abstractmethod
    def insertion(self, messages: list[Message], result: SampleResult, turn: int) -> str | None:
        """Text to insert after the model's output (None: episode over)."""

    def step(self, request: RolloutRequest, result: SampleResult, turn: int) -> RolloutRequest | None:
        messages = conversation_of(request)
        text = self.insertion(messages, result, turn)
        if text is None:
            return None
        if messages and messages[-1]["role"] == "assistant" and turn > 0:
            messages[-1]["content"] += result.text + text
        else:
            messages.append({"role": "assistant", "content": result.text + text})
        env_ids = self.tokenizer.encode(text, add_special_tokens=False)
        return replace(request, messages=messages, prompt_token_ids=result.all_token_ids + list(env_ids))


def chat_turn_token_ids(tokenizer, conversation: list[Message], new_messages: list[Message], generated: list[int]) -> list[int]:
    """Tokens the chat template puts after the assistant's generated content when `new_messages`
    follow: the rest of the assistant turn's closing, the new messages, the next generation prompt.

    Found by rendering the conversation with a sentinel as the last assistant content and taking the
    text after it, so earlier turns are never re-tokenized (templates that rewrite history, e.g.
    dropping old <think> blocks, do not disturb the token record). If the model already generated
    the end-of-turn token (eos), it is not inserted again."""
    sentinel = "\u2063megarl-turn-end\u2063"
    if not conversation or conversation[-1]["role"] != "assistant":
        raise ValueError("chat_turn_token_ids: the conversation must end with the assistant's message")
    probe = conversation[:-1] + [{**conversation[-1], "content": sentinel}]
    text = tokenizer.apply_chat_template(probe + new_messages, tokenize=False, add_generation_prompt=True)
    tail = text[text.index(sentinel) + len(sentinel) :]
    eos = tokenizer.eos_token
    if generated and generated[-1] == tokenizer.eos_token_id and eos and tail.startswith(eos):
        tail = tail[len(eos) :]
    return list(tokenizer.encode(tail, add_special_tokens=False))


@register_scheduler("single_turn")
class SingleTurnScheduler(MultiTurnScheduler):
    """One turn per episode (plain RL on prompts)."""

    def __init__(self, tokenizer=None, max_turns: int = 1):
        super().__init__(tokenizer, max_turns=1)

    def step(self, request, result, turn):
        return None


def run_multi_turn(
    engine,
    requests: list[RolloutRequest],
    sampling: SamplingOptions,
    scheduler: MultiTurnScheduler,
    *,
    prompt_token_ids=None,
    max_total_tokens: int | None = None,
) -> list[list[Trajectory]]:
    """Run every request's episodes to the end; `engine` is an EngineGroup or a VLLMEngine (anything
    with `generate(requests, sampling)`). Returns `trajectories[i][j]`: episode j (of sampling.n)
    of request i. All live episodes of a turn go to the engine in one batch.

    `prompt_token_ids(request) -> list[int]` tokenizes message requests (default: the scheduler's
    tokenizer's chat template, the same the engine applies). `max_total_tokens` ends an episode
    with finish reason "length" before its prompt would not leave room for a turn."""
    tokenize = prompt_token_ids or (lambda r: _chat_prompt_ids(scheduler.tokenizer, r))
    one = sampling.with_(n=1)
    episodes = []  # (request index, sample index, current request, trajectory)
    for i, request in enumerate(requests):
        ids = list(request.prompt_token_ids) if request.prompt_token_ids is not None else tokenize(request)
        for j in range(sampling.n):
            seed = None if sampling.seed is None else sampling.seed + j * 1_000_003 + i
            current = replace(request, prompt_token_ids=ids, sampling=(request.sampling or one).with_(n=1, seed=seed))
            traj = Trajectory(conversation_of(request), len(ids), list(ids), [0] * len(ids), [0.0] * len(ids), metadata=dict(request.metadata))
            episodes.append([i, j, current, traj])
    turn = 0
    while True:
        live = [e for e in episodes if not e[3].finished]
        if not live:
            break
        outputs = engine.generate([e[2] for e in live], one)
        for episode, samples in zip(live, outputs, strict=True):
            _advance(episode, samples[0], turn, scheduler, max_total_tokens, one)
        turn += 1
    out: list[list[Trajectory]] = [[None] * sampling.n for _ in requests]  # type: ignore[list-item]
    for i, j, _, traj in episodes:
        out[i][j] = traj
    return out


def _advance(episode, result: SampleResult, turn: int, scheduler, max_total_tokens, sampling) -> None:
    _, _, request, traj = episode
    traj.token_ids += result.token_ids
    traj.loss_mask += [1] * len(result.token_ids)
    traj.rollout_logprobs += result.logprobs
    traj.num_turns = turn + 1
    traj.finish_reason = result.finish_reason
    done = scheduler.check_finished(request, result, turn)
    following = None if done else scheduler.step(request, result, turn)
    if following is None:
        if isinstance(scheduler, ContinueScheduler):
            traj.messages = _close_continue(conversation_of(request), result, turn)
        else:
            traj.messages = conversation_of(request) + [{"role": "assistant", "content": result.text}]
        traj.finished = True
        return
    before = result.all_token_ids
    new_ids = list(following.prompt_token_ids or [])
    if new_ids[: len(before)] != before:
        raise ValueError(
            f"{type(scheduler).__name__}.step changed tokens before the end of turn {turn}: multi-turn "
            "training needs append-only token sequences (next prompt = prompt + generated + environment tokens)"
        )
    env_ids = new_ids[len(before) :]
    traj.token_ids += env_ids
    traj.loss_mask += [0] * len(env_ids)
    traj.rollout_logprobs += [0.0] * len(env_ids)
    traj.messages = conversation_of(following)
    budget = sampling.max_tokens if following.sampling is None else following.sampling.max_tokens
    if max_total_tokens is not None and len(new_ids) + budget > max_total_tokens:
        traj.finish_reason = "length"
        traj.finished = True
        return
    episode[2] = following if following.sampling is not None else replace(following, sampling=request.sampling)


def _close_continue(messages: list[Message], result: SampleResult, turn: int) -> list[Message]:
    if messages and messages[-1]["role"] == "assistant" and turn > 0:
        messages[-1]["content"] += result.text
    else:
        messages.append({"role": "assistant", "content": result.text})
    return messages


def _chat_prompt_ids(tokenizer, request: RolloutRequest) -> list[int]:
    if tokenizer is None:
        raise ValueError("run_multi_turn: message requests need a tokenizer (scheduler.tokenizer or prompt_token_ids=)")
    ids = tokenizer.apply_chat_template(request.messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]
