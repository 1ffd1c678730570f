"""The data loader: sizes, seeded shuffles, grouping by length, exact resume mid-epoch."""
import json

import numpy as np
import pytest

from minigpt.data import collate
from minigpt.loader import DataLoader


PAD = 10_000


class NumberedDataset(list):
    """Example i is [i, i, ...] with a random length 1..40, so a batch row names its example."""

    def batch(self, indices):
        return collate([self[i] for i in indices])


def numbered_dataset(n=103, seed=0):
    lengths = np.random.default_rng(seed).integers(1, 41, size=n)
    return NumberedDataset([i] * int(length) for i, length in enumerate(lengths))


def epoch_indices(loader):
    return [inputs[:, 0].tolist() for inputs, _ in loader]


def test_loader_len_and_drop_last():
    dataset = numbered_dataset(103)
    assert len(DataLoader(dataset, 10)) == 11
    assert len(DataLoader(dataset, 10, drop_last=True)) == 10
    dropping = DataLoader(dataset, 10, drop_last=True)
    assert sum(len(batch) for batch in epoch_indices(dropping)) == 100
    assert epoch_indices(DataLoader(dataset, 50))[2] == [100, 101, 102]


@pytest.mark.parametrize("group", [False, True])
def test_loader_shuffle_is_seeded_new_each_epoch_and_complete(group):
    dataset = numbered_dataset()
    a = DataLoader(dataset, 8, shuffle=True, seed=3, group_by_length=group)
    b = DataLoader(dataset, 8, shuffle=True, seed=3, group_by_length=group)
    a_epochs = [epoch_indices(a) for _ in range(2)]
    assert a_epochs == [epoch_indices(b) for _ in range(2)]
    assert a_epochs[0] != a_epochs[1]
    assert a_epochs[0] != epoch_indices(DataLoader(dataset, 8, shuffle=True, seed=4))
    for epoch in a_epochs:
        assert sorted(i for batch in epoch for i in batch) == list(range(len(dataset)))
    assert a.epoch == 2


def test_group_by_length_cuts_padding():
    dataset = numbered_dataset(400)

    def padding(loader):  # positions that are not real tokens, over one epoch
        return sum(inputs.size - sum(len(dataset[i]) for i in inputs[:, 0]) for inputs, _ in loader)
    plain = padding(DataLoader(dataset, 8, shuffle=True))
    grouped = padding(DataLoader(dataset, 8, shuffle=True, group_by_length=True))
    assert grouped < plain / 3


@pytest.mark.parametrize("group", [False, True])
def test_loader_resumes_exactly_mid_epoch(group):
    dataset = numbered_dataset()
    options = dict(batch_size=8, shuffle=True, seed=7, group_by_length=group)
    uninterrupted = DataLoader(dataset, **options)
    expected = epoch_indices(uninterrupted) + epoch_indices(uninterrupted)

    first = DataLoader(dataset, **options)
    seen = epoch_indices(first)
    for batch_number, (inputs, _) in enumerate(first):  # epoch 2, stopped after 5 batches
        seen.append(inputs[:, 0].tolist())
        if batch_number == 4:
            break
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = DataLoader(dataset, **dict(options, seed=999))  # the state, not the seed, decides
    resumed.load_state_dict(state)
    assert seen + epoch_indices(resumed) == expected
    assert resumed.epoch == 2
    assert epoch_indices(resumed) == epoch_indices(uninterrupted)  # and epoch 3 matches too


def test_loader_resume_after_a_finished_epoch_starts_the_next():
    dataset = numbered_dataset()
    a = DataLoader(dataset, 8, shuffle=True, seed=1)
    epoch_indices(a)
    b = DataLoader(dataset, 8, shuffle=True, seed=2)
    b.load_state_dict(a.state_dict())
    assert epoch_indices(b) == epoch_indices(a) and b.epoch == a.epoch == 2


def test_loader_state_errors():
    loader = DataLoader(numbered_dataset(), 8)
    with pytest.raises(ValueError, match="missing rng_state"):
        loader.load_state_dict({"epoch": 1, "batches_done": 0, "num_batches": 13})
    other = DataLoader(numbered_dataset(), 4).state_dict()
    with pytest.raises(ValueError, match="state is for 26 batches per epoch, but this loader has 13"):
        loader.load_state_dict(other)
    damaged = dict(loader.state_dict(), rng_state={"bit_generator": "PCG64", "state": "?"})
    with pytest.raises(ValueError, match="data loader state has an invalid rng_state"):
        loader.load_state_dict(damaged)
