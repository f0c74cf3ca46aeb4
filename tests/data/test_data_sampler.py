import numpy as np
import pytest

from baobab.data import GlobalSampler
from baobab.data.sampler import ordered_batches, spread_sample


def ranks(n, batch_size, world_size, **kw) -> list[GlobalSampler]:
    return [GlobalSampler(n, batch_size, r, world_size, **kw) for r in range(world_size)]


def global_steps(samplers: list[GlobalSampler], steps: int) -> list[np.ndarray]:
    """Each step's global batch: the ranks' batches concatenated in rank order."""
    return [np.concatenate([s.next_indices() for s in samplers]) for _ in range(steps)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_each_sample_goes_to_exactly_one_rank(world_size, drop_last):
    n, bs = 50, 3
    samplers = ranks(n, bs, world_size, seed=7, drop_last=drop_last)
    per_epoch = samplers[0].batches_per_epoch
    assert all(s.batches_per_epoch == per_epoch for s in samplers)
    for epoch in range(2):
        assert all(s.epoch == epoch and s.cursor == 0 for s in samplers)
        seen = [[] for _ in samplers]
        for _ in range(per_epoch):
            for r, s in enumerate(samplers):
                seen[r].extend(s.next_indices().tolist())
        sets = [set(x) for x in seen]
        assert sum(len(x) for x in seen) == sum(len(x) for x in sets)  # no repeats
        for a in range(world_size):
            for b in range(a + 1, world_size):
                assert not sets[a] & sets[b]
        union = set().union(*sets)
        if drop_last:
            gbs = bs * world_size
            assert len(union) == n // gbs * gbs
        else:
            assert union == set(range(n))
    assert samplers[0].epoch == 2


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_concatenate_to_the_single_process_batch(world_size):
    single = global_steps([GlobalSampler(40, 2 * world_size, seed=3)], 12)
    multi = global_steps(ranks(40, 2, world_size, seed=3), 12)
    for a, b in zip(single, multi):
        np.testing.assert_array_equal(a, b)


def test_epochs_reshuffle_and_shuffle_off_is_identity():
    s = GlobalSampler(10, 10, seed=0)
    e0, e1 = s.next_indices(), s.next_indices()
    assert sorted(e0) == sorted(e1) == list(range(10)) and not np.array_equal(e0, e1)
    np.testing.assert_array_equal(
        GlobalSampler(10, 10, shuffle=False).next_indices(), np.arange(10)
    )
    np.testing.assert_array_equal(
        GlobalSampler(10, 10, seed=5).permutation(2), np.random.default_rng([5, 2]).permutation(10)
    )


def test_partial_last_batch_without_drop_last():
    # 10 samples, global batch 4 over 2 ranks: 2 full steps, then 2 samples split 1/1
    samplers = ranks(10, 2, 2, shuffle=False, drop_last=False)
    assert samplers[0].batches_per_epoch == 3
    steps = [[s.next_indices().tolist() for s in samplers] for _ in range(3)]
    assert steps == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8], [9]]]
    assert samplers[0].epoch == 1 and samplers[0].cursor == 0


@pytest.mark.parametrize("new_world, new_bs", [(2, 3), (1, 6), (3, 2), (6, 1)])
def test_resume_mid_epoch(new_world, new_bs):
    n, steps_before, steps_after = 40, 9, 15  # crosses an epoch boundary after resuming
    reference = global_steps(ranks(n, 3, 2, seed=11), steps_before + steps_after)

    before = ranks(n, 3, 2, seed=11)
    global_steps(before, steps_before)
    states = [s.state_dict() for s in before]
    assert all(st == states[0] for st in states)  # the state is global, not per rank
    assert all(type(v) is int for v in states[0].values())
    assert set(states[0]) == {"epoch", "cursor", "seed", "num_samples"}

    after = ranks(n, new_bs, new_world, seed=999)  # the saved seed wins
    for s in after:
        s.load_state_dict(states[0])
    for a, b in zip(reference[steps_before:], global_steps(after, steps_after)):
        np.testing.assert_array_equal(a, b)


def test_state_at_epoch_end_rolls_over():
    s = GlobalSampler(10, 4, seed=1)  # 2 steps per epoch, 2 samples dropped
    s.next_indices()
    s.next_indices()
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["cursor"] == 0


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        GlobalSampler(0, 4)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        GlobalSampler(10, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        GlobalSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalSampler(5, 3, world_size=2)
    s = GlobalSampler(10, 2)
    with pytest.raises(ValueError, match="state is for 11 samples but this dataset has 10"):
        s.load_state_dict({"epoch": 0, "cursor": 0, "seed": 0, "num_samples": 11})


@pytest.mark.parametrize(("n", "count"), [(100, 7), (64, 8), (9, 9), (5, 12)])
def test_spread_sample_takes_one_sample_per_stratum(n, count):
    sample = spread_sample(n, count, seed=5)
    np.testing.assert_array_equal(sample, spread_sample(n, count, seed=5))  # fixed by the seed
    if count >= n:
        np.testing.assert_array_equal(sample, np.arange(n))
        return
    bounds = np.arange(count + 1) * n // count
    assert sample.dtype == np.int64 and sample.shape == (count,)
    assert np.all((bounds[:-1] <= sample) & (sample < bounds[1:]))  # sorted, distinct, spread
    with pytest.raises(ValueError, match="at least 1 sample"):
        spread_sample(n, 0, seed=5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_one_evaluation_sample(world_size):
    """Each rank evaluates its share of the same global sample, whatever the world size."""
    sample = spread_sample(1000, 30, seed=1)  # 30 = 5 global batches of 6
    single = list(ordered_batches(1000, 6, indices=sample))
    shares = [list(ordered_batches(1000, 6 // world_size, r, world_size, sample))
              for r in range(world_size)]  # fmt: skip
    for step, whole in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([s[step] for s in shares]), whole)
