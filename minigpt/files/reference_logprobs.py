"""The DPO reference model's log-probabilities on disk: computed once before a DPO run, read back on resume.

    reference-logprobs.npz   arrays <split>/chosen and <split>/rejected (N,) for train, val and test, and
                             "meta" (JSON: format, reduction, each split's dataset fingerprint)

The fingerprints tie the file to the pairs it was computed for (entries, tokenizer, prompt style, cut) and
to the reference model's weights: other pairs, or another reference, are refused, since the DPO loss would
be wrong without a word.
"""
import json
from pathlib import Path

import numpy as np

from ..dpo import ReferenceLogprobs
from .fileio import BadFileError, atomic_write, open_npz, parse_json

REFERENCE_FORMAT = "minigpt-dpo-reference-1"
SPLITS = ("train", "val", "test")


def write_references(path, references, reference_weights):
    """The reference log-probabilities of each split, atomically: arrays <split>/chosen and
    <split>/rejected (N,), and "meta" (JSON: format, reduction, each split's dataset fingerprint, and
    `reference_weights`, the reference model's files.weights.weights_fingerprint)."""
    arrays = {}
    for split, reference in zip(SPLITS, references):
        arrays[f"{split}/chosen"], arrays[f"{split}/rejected"] = reference.chosen, reference.rejected
    meta = {"format": REFERENCE_FORMAT, "reduction": references[0].reduction,
            "fingerprints": {split: reference.fingerprint for split, reference in zip(SPLITS, references)},
            "reference_weights": reference_weights}
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def read_references(path, datasets, reference_weights=None):
    """The ReferenceLogprobs of `datasets` (train, val, test) from `path`; one clear error when the file
    is missing, damaged, computed for other pairs, or (given `reference_weights`, the fingerprint the run
    recorded) computed with another reference model."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: a DPO run needs its reference model's log-probabilities "
                                f"to resume; start a new run")
    with open_npz(path, error=BadFileError) as archive:
        meta = parse_json(str(archive["meta"][()]), f"{path}: meta")
        if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT:
            raise BadFileError(f"{path}: not minigpt's reference log-probabilities ({REFERENCE_FORMAT})")
        if reference_weights is not None and meta.get("reference_weights") != reference_weights:
            theirs = meta.get("reference_weights")
            raise BadFileError(f"{path}: the reference log-probabilities were computed with another "
                               f"reference model (weights fingerprint {theirs}, the run's is "
                               f"{reference_weights}); resume with the run's own file, or start a new run")
        references = []
        for split, dataset in zip(SPLITS, datasets):
            if meta["fingerprints"].get(split) != dataset.fingerprint:
                raise ValueError(f"{path}: the reference log-probabilities are of other {split} pairs (other "
                                 f"data, tokenizer, prompt style or length); resume with the run's data")
            chosen, rejected = (_logprobs(archive, f"{split}/{side}", len(dataset))
                                for side in ("chosen", "rejected"))
            references.append(ReferenceLogprobs(chosen, rejected, meta["reduction"], dataset.fingerprint))
    return references


def _logprobs(archive, name, n):
    values = archive[name]
    if values.shape != (n,) or not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
        raise BadFileError(f"{archive.path}: {name} must hold {n} finite floats, got {values.dtype} "
                           f"{values.shape}")
    return values
