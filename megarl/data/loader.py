"""Seeded, epoch-based batching whose position is saved and restored exactly.

The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``: it depends
only on (seed, epoch), so a resumed run needs just (epoch, batch position) to continue with the very
batches the interrupted run would have drawn next, across epoch boundaries too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np


class ResumableBatchSampler:
    """Batches of dataset indices, epoch after epoch.

    drop_last=True: every batch has ``batch_size`` indices and each epoch's remainder is skipped
    (the next epoch reshuffles everything); drop_last=False: the last batch of an epoch may be short.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if drop_last and num_samples < batch_size:
            raise ValueError(f"the dataset has {num_samples} prompts, fewer than one batch of {batch_size}; "
                             "lower the batch size or set drop_last=False")
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The index order of ``epoch`` ([num_samples] int64)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[int, int, list[int]]:
        """(epoch, batch position in the epoch, indices) of the next batch; advances the position."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        start = self.batch_in_epoch * self.batch_size
        indices = self.epoch_order(self.epoch)[start:start + self.batch_size].tolist()
        position = (self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        return position[0], position[1], indices

    @property
    def batches_consumed(self) -> int:
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. The dataset size and batching must match what was saved, or the
        restored position would point at different prompts: that is an error, not a silent reshuffle."""
        for key in ("seed", "num_samples", "batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data sampler: saved {key}={state[key]!r}, "
                                 f"now {getattr(self, key)!r}")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


@dataclass
class PromptBatch:
    """A batch of samples (dataset items) with its place in the data stream."""

    epoch: int
    batch_in_epoch: int
    samples: list


class PromptDataLoader:
    """Iterates batches of ``dataset[i]`` items; ``num_epochs=None`` iterates forever.

    ``state_dict()`` after k batches, loaded into a new loader over the same dataset, makes the new
    loader yield exactly the batches k+1, k+2, ... of the original.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_epochs: int | None = None):
        self.dataset = dataset
        self.num_epochs = num_epochs
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, seed, shuffle, drop_last)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def total_batches(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.batches_per_epoch

    def __iter__(self) -> Iterator[PromptBatch]:
        return self

    def __next__(self) -> PromptBatch:
        total = self.total_batches
        if total is not None and self.sampler.batches_consumed >= total:
            raise StopIteration
        epoch, position, indices = self.sampler.next_batch()
        return PromptBatch(epoch=epoch, batch_in_epoch=position, samples=[self.dataset[i] for i in indices])

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
