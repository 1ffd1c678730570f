"""DPO in the pipeline (minigpt.finetune, `train.py --method dpo`): preference tuning of a fine-tuned model.

    python train.py --method dpo --weights runs/NAME/model-final.npz --data pairs.json

The model the run starts from is both the policy, which trains, and the reference, which never changes
(minigpt.dpo). So before the first step its log-probabilities of every pair are computed once, under
no_grad, and kept in the run folder; the policy alone then runs in each step. A run folder holds what a
fine-tuning run's holds (checkpoint.npz, history.json, model-final/best.npz, test-responses.json,
metrics.json; with LoRA the adapters too), and:

    reference-logprobs.npz   the reference's log-probabilities of the train, validation and test pairs,
                             tied to them by fingerprint: a resumed run reads them back
    loss-plot.png            DPO loss and reward margin, training and validation, against epochs

The data are preference pairs, {instruction, input, output, chosen, rejected}: rasbt's
instruction-data-with-preference.json ("reference", downloaded) or a JSON file in that layout, split
85% / 5% / 10% as for fine-tuning. Every evaluation prints, besides the losses, the reward margin and the
reward accuracy of the training and validation pairs; metrics.json adds them for the test pairs.
Test responses are greedy answers to the test prompts, scored against the chosen response.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from . import dpo
from .data import DataLoader
from .fileio import atomic_write, open_npz, parse_json
from .preference import (PreferenceDataset, download_preference_data, load_preference_data,
                         split_preference_data)
from .safetensors import CheckpointError
from .training import calc_metrics_loader

REFERENCE_NAME = "reference-logprobs.npz"
REFERENCE_FORMAT = "minigpt-dpo-reference-1"
SPLITS = ("train", "val", "test")


def load_splits(config):
    """(train, val, test) preference entries of the run's data."""
    path = download_preference_data(config.data_dir) if config.data == "reference" else config.data
    train, val, test = split_preference_data(load_preference_data(path), shuffle_seed=config.shuffle_seed)
    if not (train and val and test):
        raise ValueError(f"{path}: {len(train)} train / {len(val)} validation / {len(test)} test pairs "
                         f"after the 85% / 5% / 10% split; every part needs at least one (use more pairs)")
    return train, val, test


class DPOObjective:
    """training.train's objective for preference pairs: DPO's loss of a PreferenceBatch, with the cached
    reference log-probabilities of its dataset, and the rewards as metrics (dpo.dpo_batch_loss)."""
    printed = ("reward_margin", "reward_accuracy")

    def __init__(self, references, beta=dpo.DEFAULT_BETA, nll_weight=0.0):
        self.references = {reference.fingerprint: reference for reference in references}
        self.beta = beta
        self.nll_weight = nll_weight

    def __call__(self, model, batch):
        return dpo.dpo_batch_loss(model, batch, self.references[batch.fingerprint], self.beta,
                                  self.nll_weight)


@dataclasses.dataclass
class DPORun:
    """What finetune.run_claimed needs from the DPO side."""
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    objective: DPOObjective


def prepare(run_dir, config, model, tokenizer, splits, resume, log=print):
    """Tokenize the pairs, get the reference log-probabilities (computed from `model`, which must hold the
    starting weights, or read back on resume) and build the loaders and the objective."""
    max_length = min(config.allowed_max_length, model.cfg.context_length)
    datasets = [PreferenceDataset(entries, tokenizer, config.prompt_style, allowed_max_length=max_length)
                for entries in splits]
    path = Path(run_dir) / REFERENCE_NAME
    if resume:
        references = read_references(path, datasets)
    else:
        references = [dpo.reference_logprobs(model, dataset, config.batch_size) for dataset in datasets]
        write_references(path, references)
        log(f"reference log-probabilities of {' / '.join(str(len(d)) for d in datasets)} train / val / test "
            f"pairs: {path}")
    train_loader = DataLoader(datasets[0], config.batch_size, shuffle=True, drop_last=True, seed=config.seed)
    if len(train_loader) == 0:
        raise ValueError(f"{len(datasets[0])} training pairs make no full batch of {config.batch_size}; "
                         f"lower --batch-size")
    val_loader, test_loader = (DataLoader(dataset, config.batch_size) for dataset in datasets[1:])
    return DPORun(train_loader, val_loader, test_loader,
                  DPOObjective(references, config.beta, config.nll_weight))


def first_batch(config, tokenizer, context_length):
    """The run's first training batch (for --show-batch) with each pair's rows side by side: inputs and
    targets (2B, T), row 2i the chosen and row 2i + 1 the rejected sequence of pair i; and the cut."""
    max_length = min(config.allowed_max_length, context_length)
    dataset = PreferenceDataset(load_splits(config)[0], tokenizer, config.prompt_style, max_length)
    loader = DataLoader(dataset, config.batch_size, shuffle=True, drop_last=True, seed=config.seed)
    batch = next(iter(loader))
    order = np.arange(2 * batch.size).reshape(2, -1).T.ravel()  # 0, B, 1, B + 1, ...
    return batch.inputs[order], batch.targets[order], max_length


def write_references(path, references):
    """The reference log-probabilities of each split, atomically: arrays <split>/chosen and
    <split>/rejected (N,), and "meta" (JSON: format, reduction, each split's dataset fingerprint)."""
    arrays = {}
    for split, reference in zip(SPLITS, references):
        arrays[f"{split}/chosen"], arrays[f"{split}/rejected"] = reference.chosen, reference.rejected
    meta = {"format": REFERENCE_FORMAT, "reduction": references[0].reduction,
            "fingerprints": {split: reference.fingerprint for split, reference in zip(SPLITS, references)}}
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def read_references(path, datasets):
    """The ReferenceLogprobs of `datasets` (train, val, test) from `path`; one clear error when the file
    is missing, damaged, or was computed for other pairs."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: a DPO run needs its reference model's log-probabilities "
                                f"to resume; start a new run")
    with open_npz(path, error=CheckpointError) as archive:
        meta = parse_json(str(archive["meta"][()]), f"{path}: meta")
        if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT:
            raise CheckpointError(f"{path}: not minigpt's reference log-probabilities ({REFERENCE_FORMAT})")
        references = []
        for split, dataset in zip(SPLITS, datasets):
            if meta["fingerprints"].get(split) != dataset.fingerprint:
                raise ValueError(f"{path}: the reference log-probabilities are of other {split} pairs (other "
                                 f"data, tokenizer, prompt style or length); resume with the run's data")
            chosen, rejected = (_logprobs(archive, f"{split}/{side}", len(dataset))
                                for side in ("chosen", "rejected"))
            references.append(dpo.ReferenceLogprobs(chosen, rejected, meta["reduction"], dataset.fingerprint))
    return references


def _logprobs(archive, name, n):
    values = archive[name]
    if values.shape != (n,) or not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
        raise CheckpointError(f"{archive.path}: {name} must hold {n} finite floats, got {values.dtype} "
                              f"{values.shape}")
    return values


def test_metrics(model, run):
    """The objective's loss and rewards over the test pairs, in eval mode (no dropout), each pair counted
    once (calc_metrics_loader's per_example)."""
    was_training = model.training
    model.eval()
    try:
        return calc_metrics_loader(model, run.test_loader, objective=run.objective, per_example=True)
    finally:
        model.train(was_training)


def format_test_metrics(metrics, n_pairs):
    """'test pairs (110): DPO loss 0.512, reward margin 0.301, reward accuracy 0.918' (the DPO part of
    the loss alone when it has a chosen-NLL term)."""
    return (f"test pairs ({n_pairs}): DPO loss {metrics.get('dpo_loss', metrics['loss']):.3f}, "
            f"reward margin {metrics['reward_margin']:.3f}, "
            f"reward accuracy {metrics['reward_accuracy']:.3f}")


def scored_against_chosen(entries):
    """Copies of the test entries whose "output" is their chosen response: what the scores compare with."""
    return [dict(entry, output=entry["chosen"]) for entry in entries]
