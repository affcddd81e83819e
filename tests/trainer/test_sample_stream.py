"""The supervised loops' data stream: the uncapped stream is the RL loader's, the cap is never
exceeded and ends the stream, and a restored state continues with the very same batches."""

from collections import Counter

import pytest

from megarl.data.loader import ResumableBatchSampler
from megarl.trainer.sample_stream import SampleStream


def _drain(stream, limit=1000):
    batches = []
    while len(batches) < limit:
        batch = stream.next_batch()
        if batch is None:
            break
        batches.append(batch)
    return batches


def test_uncapped_stream_equals_the_rl_sampler():
    stream = SampleStream(10, 4, seed=3, num_epochs=3)
    sampler = ResumableBatchSampler(10, 4, seed=3, drop_last=True)
    expected = [sampler.next_batch()[2] for _ in range(3 * sampler.batches_per_epoch)]
    assert _drain(stream) == expected  # 2 batches per epoch, remainders dropped, then the stream ends


@pytest.mark.parametrize("num_samples,batch_size,cap", [(10, 4, 2), (12, 4, 3), (7, 3, 1), (5, 5, 2)])
def test_cap_is_never_exceeded_and_ends_the_stream(num_samples, batch_size, cap):
    stream = SampleStream(num_samples, batch_size, seed=0, max_count=cap)
    batches = _drain(stream)
    trained = Counter(i for batch in batches for i in batch)
    assert all(len(set(batch)) == len(batch) for batch in batches)  # no sample twice in one batch
    assert all(len(batch) == batch_size for batch in batches[:-1])
    assert trained == Counter({i: cap for i in range(num_samples)})
    assert stream.counts == [cap] * num_samples
    assert len(batches) == -(-num_samples * cap // batch_size)
    assert len(batches) <= stream.max_batches


def test_state_restores_the_same_batches():
    stream = SampleStream(10, 4, seed=5, max_count=3)
    first = _drain(stream, limit=3)
    state = stream.state_dict()
    rest = _drain(stream)
    resumed = SampleStream(10, 4, seed=5, max_count=3)
    resumed.load_state_dict(state)
    assert _drain(resumed) == rest
    assert resumed.counts == stream.counts == [3] * 10
    assert len(first) == 3
    with pytest.raises(ValueError, match="saved batch_size=4, now 5"):
        SampleStream(10, 5, seed=5, max_count=3).load_state_dict(state)


def test_too_few_left_for_every_data_parallel_rank_ends_the_stream():
    stream = SampleStream(5, 4, seed=0, max_count=1, min_batch_size=2)
    assert len(_drain(stream)) == 1  # one sample is left below the cap: it cannot feed 2 DP ranks
    assert sorted(stream.counts) == [0, 1, 1, 1, 1]
