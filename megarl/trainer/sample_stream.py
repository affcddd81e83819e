"""Batches of dataset indices for supervised training: seeded epochs, an optional cap on how often a
sample is trained, and a position that is saved and restored exactly.

The order of epoch `e` is `numpy.random.default_rng([seed, e]).permutation(n)` (as in
`megarl.data.loader`), so the state is just (epoch, position in that order, per-sample counts).

Without a cap a batch is `batch_size` consecutive indices of the epoch order and an epoch's
remainder is skipped (the next epoch reshuffles everything). With `max_count`, samples trained
`max_count` times are skipped, a batch may continue into the next epoch (never holding a sample
twice), and when fewer than `batch_size` samples are left below the cap they form one last, shorter
batch; the stream ends when every sample has reached the cap.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SampleStream:
    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, max_count: int | None = None, min_batch_size: int = 1):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one batch of {batch_size}; "
                             "lower data.train_batch_size")
        if max_count is not None and max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.num_epochs, self.max_count, self.min_batch_size = num_epochs, max_count, min_batch_size
        self.epoch = 0
        self.position = 0
        self.counts = [0] * num_samples  # times each sample was handed out for training
        self.num_below_cap = num_samples
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return self._cached[1]

    @property
    def max_batches(self) -> int | None:
        """An upper bound on the batches this stream yields (None: endless), for the LR schedule."""
        bounds = []
        if self.num_epochs is not None:
            bounds.append(self.num_epochs * (self.num_samples // self.batch_size))
        if self.max_count is not None:
            bounds.append(-(-self.num_samples * self.max_count // self.batch_size) + 1)
        return min(bounds) if bounds else None

    def _eligible(self, index: int) -> bool:
        return self.max_count is None or self.counts[index] < self.max_count

    def _epochs_done(self) -> bool:
        return self.num_epochs is not None and self.epoch >= self.num_epochs

    def next_batch(self) -> list[int] | None:
        """The next batch of indices (their counts are incremented), or None when the stream ended."""
        if self.max_count is not None and self.num_below_cap < self.batch_size:
            return self._last_batch([i for i in range(self.num_samples) if self._eligible(i)])
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position >= self.num_samples:
                if self.max_count is None:
                    batch = []  # drop the epoch's remainder
                self.epoch, self.position = self.epoch + 1, 0
            if self._epochs_done():
                return None
            index = int(self.epoch_order(self.epoch)[self.position])
            self.position += 1
            if self._eligible(index) and index not in batch:
                batch.append(index)
        self._count(batch)
        return batch

    def _last_batch(self, left: list[int]) -> list[int] | None:
        if len(left) < self.min_batch_size or self._epochs_done():
            return None  # nothing left (or too few samples to give every data-parallel rank one)
        self._count(left)
        return left

    def _count(self, batch: list[int]) -> None:
        for index in batch:
            self.counts[index] += 1
            if self.counts[index] == self.max_count:
                self.num_below_cap -= 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "counts": list(self.counts), "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "max_count": self.max_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the dataset and batching must be those it was saved with."""
        for key in ("seed", "num_samples", "batch_size", "shuffle", "max_count"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data stream: saved {key}={state[key]!r}, now {getattr(self, key)!r}")
        self.epoch, self.position, self.counts = int(state["epoch"]), int(state["position"]), list(state["counts"])
        self.num_below_cap = sum(self._eligible(i) for i in range(self.num_samples))
