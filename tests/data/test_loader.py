"""Seeded epochs and exact resume of the batch position, across epoch boundaries."""

import json

import pytest

from megarl.data import PromptDataLoader, ResumableBatchSampler


class Items:
    """A stand-in dataset: item i is i (the loader only needs len() and [])."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def take(loader, k):
    return [(b.epoch, b.batch_in_epoch, b.samples) for b in (next(loader) for _ in range(k))]


@pytest.mark.parametrize("drop_last", [True, False])
def test_each_epoch_is_a_seeded_permutation(drop_last):
    sampler = ResumableBatchSampler(10, 3, seed=7, drop_last=drop_last)
    orders = [sampler.epoch_order(e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert ResumableBatchSampler(10, 3, seed=7).epoch_order(1).tolist() == orders[1]
    assert ResumableBatchSampler(10, 3, seed=8).epoch_order(1).tolist() != orders[1]
    loader = PromptDataLoader(Items(10), 3, seed=7, drop_last=drop_last)
    batches = take(loader, loader.batches_per_epoch)
    flat = [i for _, _, samples in batches for i in samples]
    assert flat == (orders[0][:9] if drop_last else orders[0])
    assert [len(s) for _, _, s in batches] == ([3, 3, 3] if drop_last else [3, 3, 3, 1])


@pytest.mark.parametrize("drop_last, consumed", [(True, 2), (True, 3), (True, 5), (False, 4), (False, 6)])
def test_resume_gives_identical_batches_across_epochs(drop_last, consumed):
    reference = PromptDataLoader(Items(10), 3, seed=3, drop_last=drop_last)
    expected = take(reference, consumed + 8)[consumed:]   # crosses at least two epoch boundaries

    interrupted = PromptDataLoader(Items(10), 3, seed=3, drop_last=drop_last)
    take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
    resumed = PromptDataLoader(Items(10), 3, seed=3, drop_last=drop_last)
    resumed.load_state_dict(state)
    assert take(resumed, 8) == expected
    assert {e for e, _, _ in expected} >= {1, 2}


def test_no_shuffle_is_in_order():
    loader = PromptDataLoader(Items(5), 2, shuffle=False, drop_last=False)
    assert [b.samples for b in (next(loader) for _ in range(4))] == [[0, 1], [2, 3], [4], [0, 1]]


def test_num_epochs_ends_iteration():
    loader = PromptDataLoader(Items(7), 2, seed=0, num_epochs=2)
    assert loader.total_batches == 6
    assert len(list(loader)) == 6
    resumed = PromptDataLoader(Items(7), 2, seed=0, num_epochs=2)
    first = PromptDataLoader(Items(7), 2, seed=0, num_epochs=2)
    take(first, 4)
    resumed.load_state_dict(first.state_dict())
    assert len(list(resumed)) == 2


def test_resume_refuses_a_different_dataset_or_batching():
    state = PromptDataLoader(Items(10), 3, seed=3).state_dict()
    with pytest.raises(ValueError, match="saved num_samples=10, now 11"):
        PromptDataLoader(Items(11), 3, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="saved batch_size=3, now 4"):
        PromptDataLoader(Items(10), 4, seed=3).load_state_dict(state)


def test_bad_sizes():
    with pytest.raises(ValueError, match="fewer than one batch"):
        PromptDataLoader(Items(2), 3)
    with pytest.raises(ValueError, match="batch_size"):
        PromptDataLoader(Items(2), 0)
