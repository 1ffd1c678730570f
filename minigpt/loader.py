"""The data loader: which examples make each batch, in which order, and where an interrupted run resumes.

After PyTorch's DataLoader, reduced to what fine-tuning needs: a seeded shuffle per epoch, an optional
drop of the last short batch, grouping by length, and a position that a checkpoint saves and restores
exactly, even in the middle of an epoch. The dataset makes each batch itself (`dataset.batch(indices)`).
"""
import numpy as np


class DataLoader:
    """The batches of an epoch, in a seeded order: `dataset.batch(indices)` for each group of indices.

    Each iteration is one epoch. With `shuffle`, the loader's own seeded generator draws a new order
    per epoch, so runs are reproducible from `seed`, and `state_dict()` / `load_state_dict()` resume
    exactly, even mid-epoch. `group_by_length` puts examples of similar length in the same batch (less
    padding): the order is sorted by length within chunks of GROUP_CHUNK_BATCHES batches, and with
    `shuffle` the batch order is then shuffled. Every example appears once per epoch (unless
    `drop_last` drops the final short batch).

    The dataset knows how to make a batch (data.InstructionDataset: padded, shifted, masked;
    preference.PreferenceDataset: chosen and rejected sequences padded together); the loader only
    chooses which examples go together, and in which order. `group_by_length` reads the examples'
    lengths as len(dataset[i]).

    Grouping makes each batch a set of similar examples. Where length goes with the kind of example
    (each task of minigpt.tasks has its own typical length), batches become single-task and training
    suffers badly: measured on the built-in tasks, 26% exact match grouped against 99% mixed.
    """
    GROUP_CHUNK_BATCHES = 50  # big enough to find similar lengths, small enough to keep randomness

    def __init__(self, dataset, batch_size, shuffle=False, drop_last=False, seed=0, group_by_length=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.group_by_length = group_by_length
        self.lengths = (np.array([len(dataset[i]) for i in range(len(dataset))])   # (N,)
                        if group_by_length else None)
        self.rng = np.random.default_rng(seed)
        self.epoch = 0                        # epochs started so far
        self._epoch_start_state = self.rng.bit_generator.state  # replays the latest epoch's order
        self._batches_done = 0                # batches yielded in the latest epoch
        self._resume_pending = False

    def __len__(self):
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _plan_epoch(self):
        """The list of index arrays for one epoch (draws from self.rng when shuffling)."""
        n = len(self.dataset)
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)   # (N,)
        if self.group_by_length:
            chunk = self.batch_size * self.GROUP_CHUNK_BATCHES
            order = np.concatenate([part[np.argsort(self.lengths[part], kind="stable")]
                                    for part in np.split(order, range(chunk, n, chunk))])
        batches = [order[i:i + self.batch_size]
                   for i in range(0, len(self) * self.batch_size, self.batch_size)]
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        if self._resume_pending:
            self._resume_pending = False
            self.rng.bit_generator.state = self._epoch_start_state
            if self._batches_done > 0:  # the saved epoch had started: replay its order
                batches = self._plan_epoch()
                if self._batches_done < len(batches):
                    yield from self._batches_from(batches, self._batches_done)
                    return
                # it had finished, and the replay left self.rng where it was after it: start the next
        self._epoch_start_state = self.rng.bit_generator.state
        self.epoch += 1
        self._batches_done = 0
        yield from self._batches_from(self._plan_epoch(), 0)

    def _batches_from(self, batches, start):
        for b in range(start, len(batches)):
            self._batches_done = b + 1
            yield self.dataset.batch(batches[b])

    def state_dict(self):
        """JSON-serialisable position: epochs started, batches yielded in the latest one (a batch counts
        as done once yielded), and the RNG state at that epoch's start."""
        return {"epoch": self.epoch, "batches_done": self._batches_done, "num_batches": len(self),
                "rng_state": self._epoch_start_state}

    def load_state_dict(self, state):
        """Resume from `state_dict()`: the next iteration continues the saved epoch where it stopped."""
        missing = [k for k in ("epoch", "batches_done", "num_batches", "rng_state") if k not in state]
        if missing:
            raise ValueError(f"data loader state is missing {', '.join(missing)}")
        if state["num_batches"] != len(self):
            raise ValueError(f"data loader state is for {state['num_batches']} batches per epoch, "
                             f"but this loader has {len(self)} (different data or batch size?)")
        try:  # setting it checks it, so a damaged state fails here rather than at the next epoch
            self.rng.bit_generator.state = state["rng_state"]
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"data loader state has an invalid rng_state: {e}") from None
        self.epoch = state["epoch"]
        self._epoch_start_state = state["rng_state"]
        self._batches_done = state["batches_done"]
        self._resume_pending = True
