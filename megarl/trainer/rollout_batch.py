"""From rollout samples and rewards to the token-aligned training batch.

A sample's sequence is prompt + response tokens. Per-token fields (see megarl.models.batch) are
aligned with those tokens:
  loss_mask         1 on response tokens the model generated, 0 on the prompt and on tokens an
                    environment inserted (multi-turn)
  rollout_logprobs  the rollout engine's log-probs of the generated tokens (0 elsewhere)
  token_rewards     the sample's outcome reward on its last loss token (0 elsewhere)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarl.models.batch import SequenceBatch


@dataclass
class RolloutBatch:
    """Training batch for one step plus what the advantage estimator and metrics need.

    `uids[i]` identifies the prompt sample i answers (GRPO groups); `scores[i]` is its reward;
    `response_lengths[i]` counts its generated tokens; `truncated[i]` is True when it hit the length
    limit.
    """

    sequences: SequenceBatch
    uids: list[str]
    scores: torch.Tensor
    response_lengths: list[int]
    truncated: list[bool]

    def __len__(self) -> int:
        return len(self.uids)


def build_rollout_batch(samples, scores, uids) -> RolloutBatch:
    """samples: flat list of SampleResult-like objects with `prompt_token_ids`, `token_ids`,
    `logprobs`, `finish_reason` and optionally `loss_mask` (per response token; multi-turn).
    scores: one float per sample. uids: one prompt id per sample."""
    if not (len(samples) == len(scores) == len(uids)):
        raise ValueError(f"{len(samples)} samples, {len(scores)} scores and {len(uids)} uids must match")
    sequences, loss_masks, rollout_logprobs, token_rewards, response_lengths = [], [], [], [], []
    for sample, score in zip(samples, scores):
        prompt, response = list(sample.prompt_token_ids), list(sample.token_ids)
        mask = list(getattr(sample, "loss_mask", None) or [1.0] * len(response))
        if len(mask) != len(response) or len(sample.logprobs) != len(response):
            raise ValueError("a sample's loss_mask and logprobs must have one entry per response token")
        if not response:  # an empty response still needs one position for the reward to sit on
            raise ValueError("a rollout sample has no response tokens; check rollout.max_new_tokens")
        reward_row = [0.0] * (len(prompt) + len(response))
        last_loss_token = max((i for i, m in enumerate(mask) if m > 0), default=len(response) - 1)
        reward_row[len(prompt) + last_loss_token] = float(score)
        sequences.append(prompt + response)
        loss_masks.append([0.0] * len(prompt) + [float(m) for m in mask])
        rollout_logprobs.append([0.0] * len(prompt) + [float(lp) * float(m > 0) for lp, m in zip(sample.logprobs, mask)])
        token_rewards.append(reward_row)
        response_lengths.append(len(response))
    batch = SequenceBatch.from_sequences(
        sequences, loss_mask=loss_masks, rollout_logprobs=rollout_logprobs, token_rewards=token_rewards
    )
    return RolloutBatch(
        sequences=batch,
        uids=list(uids),
        scores=torch.tensor([float(s) for s in scores]),
        response_lengths=response_lengths,
        truncated=[s.finish_reason == "length" for s in samples],
    )


def mini_batch_indices(num_samples: int, samples_per_mini_batch: int) -> list[list[int]]:
    """Consecutive mini-batches (samples of one prompt stay together when the size is a multiple of n)."""
    if samples_per_mini_batch < 1 or num_samples % samples_per_mini_batch:
        raise ValueError(
            f"{num_samples} samples per step do not split into mini-batches of {samples_per_mini_batch}: "
            "data.train_batch_size must be a multiple of actor.ppo_mini_batch_size"
        )
    return [list(range(s, s + samples_per_mini_batch)) for s in range(0, num_samples, samples_per_mini_batch)]
