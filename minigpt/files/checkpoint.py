"""Checkpoints: everything a run needs to continue exactly, in ONE .npz; and the best weights so far.

A checkpoint holds the weights, Adam's m and v and step counts, and a training.TrainState: where the
run stands after its last completed step (step and token counts, the history, early stopping, the
training loader's position and RNG, the dropout RNG). `restore_checkpoint` puts all of it back, so
`minigpt.training.train` continues with the very losses an uninterrupted run would have had.
Files are plain arrays plus JSON (no pickle) and are written atomically.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from ..model import GPTConfig
from ..training import TrainState
from .fileio import BadFileError, atomic_write, open_npz, parse_json
from .weights import check_float_parameter, check_stored_shapes, load_npz_arrays, save_npz

CHECKPOINT_FORMAT = "minigpt-checkpoint-1"
STATE_KEY = "state"  # the checkpoint entry holding the JSON metadata (a 0-d unicode array)


class CheckpointFile:
    """The checkpoint of one run at `path`: what training.train calls to save the run (with `run_config`,
    any JSON-able dict, kept beside the state), and what restores it."""

    def __init__(self, path, run_config=None):
        self.path = Path(path)
        self.run_config = run_config

    def save(self, model, optimizer, state):
        save_checkpoint(self.path, model, optimizer, state, self.run_config)

    def read(self):
        return read_checkpoint(self.path)

    def restore(self, model, optimizer, train_loader):
        return restore_checkpoint(self.path, model, optimizer, train_loader)


class BestWeightsFile:
    """Keeps the weights with the lowest validation loss so far in a .npz at `path`, so they survive a
    resume and a large model needs no second copy in memory (training.train's `best`); with `card`
    (files.model_card), the file says how to talk to the model."""

    def __init__(self, path, card=None):
        self.path = Path(path)
        self.card = card

    def save(self, model):
        save_npz(model, self.path, self.card)

    def restore(self, model):
        with open_npz(self.path) as archive:
            load_npz_arrays(model, archive)


def save_checkpoint(path, model, optimizer, state, run_config=None):
    """Write everything a run needs to continue exactly to ONE .npz, atomically (temp file + rename).

    Arrays:  model/<parameter name>, optimizer/exp_avg/<i>, optimizer/exp_avg_sq/<i> (Adam's m and v)
    "state": JSON in a 0-d unicode array (loads without pickle): the model's GPTConfig, the optimizer's
             scalars (lr, betas, eps, weight_decay, per-parameter steps), the TrainState (step, tokens,
             history, early stopping, loader position and RNG, dropout RNG) and `run_config`.
    """
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    for key in ("exp_avg", "exp_avg_sq"):  # the live arrays: no copy of a model-sized state
        arrays.update({f"optimizer/{key}/{i}": value for i, value in enumerate(getattr(optimizer, key))})
    meta = {"format": CHECKPOINT_FORMAT,
            "model_config": dataclasses.asdict(model.cfg),
            "optimizer": {"lr": optimizer.lr, "betas": list(optimizer.betas), "eps": optimizer.eps,
                          "weight_decay": optimizer.weight_decay, "steps": list(optimizer.steps)},
            "train_state": dataclasses.asdict(state),
            "run_config": run_config}
    arrays[STATE_KEY] = np.array(json.dumps(meta, allow_nan=False))
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def read_checkpoint(path):
    """A checkpoint's JSON metadata (model_config, optimizer, train_state, run_config); no arrays.

    The model_config is checked against the stored weights' .npy headers, so a model built from it
    fits them (and a config claiming a million layers is refused before anything is allocated).
    """
    with open_npz(path) as archive:
        meta = _metadata(path, archive)
        try:
            cfg = GPTConfig(**meta["model_config"])
        except (TypeError, ValueError) as e:  # not an object, unknown fields, invalid values
            raise BadFileError(f"{path}: model_config is not a valid GPTConfig ({e})") from None
        check_stored_shapes(path, archive.shapes("model/"), cfg)
    return meta


def restore_checkpoint(path, model, optimizer, train_loader):
    """Load a checkpoint into model, optimizer, the loader's position and the dropout RNG -> TrainState.
    Weights and Adam's moments are checked as load_npz_arrays checks weights (shape, float, finite)."""
    with open_npz(path) as archive:
        meta = _metadata(path, archive)
        load_npz_arrays(model, archive, prefix="model/")
        moments = {key: [_adam_moment(archive, f"optimizer/{key}/{i}", p.shape)
                         for i, p in enumerate(optimizer.params)] for key in ("exp_avg", "exp_avg_sq")}
        optimizer.load_state_dict({**meta["optimizer"], **moments})
    state = TrainState(**meta["train_state"])
    train_loader.load_state_dict(state.loader_state)
    model.dropout_rng.bit_generator.state = state.dropout_rng_state
    return state


def _adam_moment(archive, name, shape):
    stored = archive.header(name)[0]
    if stored != shape:
        raise BadFileError(f"{archive.path}: {name} has shape {stored}, expected {shape}")
    return check_float_parameter(archive.path, name, archive[name])


def _metadata(path, archive):
    if STATE_KEY not in archive.files:
        raise BadFileError(f"{path}: not a minigpt checkpoint (no {STATE_KEY!r} entry)")
    meta = parse_json(str(archive[STATE_KEY][()]), f"{path}: {STATE_KEY}")
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BadFileError(f"{path}: checkpoint format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    return meta
