"""LoRA adapters on disk: A and B alone in a small .npz, with what identifies the base they were trained on.

    save_adapters(model, path)        A and B of every LoRA layer, the rank, alpha, the layers' names
    load_adapters(base_model, path)   apply LoRA with the file's rank and alpha to a plain base, load A and B
    copy_adapters(model, path)        put a file's A and B back into the same LoRA layers (a run's best ones)

The method itself (the op, the layers, merging) is minigpt.lora; this is only its file format. What
identifies a base: each adapted layer's (C, OC), the GPTConfig and a CRC-32 of every base parameter, so
adapters never silently meet a different base.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from ..lora import (LoRAConfig, apply_lora, check_hyperparameters, check_plain, check_rank_fits, is_adapter,
                    layers_of, lora_config, lora_layers)
from ..nn import Linear, non_finite
from .fileio import BadFileError, atomic_write, open_npz, parse_json
from .weights import check_float_parameter, weights_fingerprint

ADAPTERS_KEY = "__lora__"            # the .npz entry holding the JSON metadata
ADAPTERS_FORMAT = "minigpt-lora-1"


def save_adapters(model, path):
    """Write A and B of every LoRA layer to one small .npz, atomically, with JSON metadata.

    Metadata: the rank, alpha, the layers' paths and what identifies the base: each layer's (C, OC),
    the model's GPTConfig and a CRC-32 of every base parameter, so the adapters never silently meet
    a different base.
    """
    config = lora_config(model)
    arrays = {name: p.data for name, p in model.named_parameters() if is_adapter(name)}
    meta = {"format": ADAPTERS_FORMAT, "rank": int(config.rank), "alpha": float(config.alpha),
            "layers": list(config.layers), "base": _base_identity(model)}
    arrays[ADAPTERS_KEY] = np.array(json.dumps(meta))  # 0-d unicode: loads without pickle
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def load_adapters(model, path):
    """Apply LoRA to the plain `model` with the file's rank and alpha, and load its A and B.

    Everything is checked before the model is touched; a file that does not fit raises
    BadFileError (a ValueError) with one line naming the file and the problem.
    """
    path = Path(path)
    meta, arrays = _read_adapters(path)
    try:
        check_plain(model)
        _check_base(model, meta)
        _check_merge_is_finite(model, meta, arrays)
    except ValueError as e:
        raise BadFileError(f"{path}: {e}") from None
    apply_lora(model, meta["rank"], meta["alpha"], targets=meta["layers"])
    _copy_adapters(model, arrays)
    return lora_config(model)


def copy_adapters(model, path):
    """Copy A and B from an adapters file into `model`, which has LoRA layers of the same paths,
    rank and alpha already (a run's best adapters, put back). A file that does not fit raises a
    one-line BadFileError and leaves the model untouched; the base is not checked (it is the
    model's own: the file came from a run on it)."""
    path = Path(path)
    meta, arrays = _read_adapters(path)
    ours = lora_config(model)
    theirs = LoRAConfig(meta["rank"], meta["alpha"], tuple(meta["layers"]))
    if theirs != ours:
        raise BadFileError(f"{path}: adapters of rank {theirs.rank}, alpha {theirs.alpha:g} on "
                           f"{len(theirs.layers)} layers; the model's are rank {ours.rank}, alpha "
                           f"{ours.alpha:g} on {len(ours.layers)} layers")
    params = dict(model.named_parameters())
    for name, array in arrays.items():
        if array.shape != params[name].shape:
            raise BadFileError(f"{path}: {name} has shape {array.shape}, expected {params[name].shape}")
    _copy_adapters(model, arrays)


def _check_merge_is_finite(model, meta, arrays):
    """A ValueError unless every merged weight W + (alpha / r) A B is finite in the model's dtype: finite A,
    B and alpha can still overflow (alpha 1e300, or A and B of 1e20), and a model merged to inf would
    generate nothing but one token."""
    linears = {path: layer for path, _, _, layer in layers_of(model, Linear)}
    scale = meta["alpha"] / meta["rank"]
    with np.errstate(over="ignore", invalid="ignore"):
        for layer in meta["layers"]:
            weight = linears[layer].weight.data                                  # (C, OC)
            A, B = (arrays[f"{layer}.{name}"].astype(weight.dtype) for name in ("lora_A", "lora_B"))
            merged = weight + weight.dtype.type(scale) * (A @ B)                # as LoRALinear.merged_weight
            if non_finite(merged) is not None:
                raise ValueError(f"merging the adapters of layer {layer} (alpha {meta['alpha']:g}, rank "
                                 f"{meta['rank']}) gives non-finite weights; the adapters cannot be used")


def _copy_adapters(model, arrays):
    for name, p in model.named_parameters():
        if is_adapter(name):
            p.data[...] = arrays[name]


def _read_adapters(path):
    """(metadata, {name: array}) of an adapters .npz, or a one-line BadFileError. Each array's shape is
    checked from its .npy header before it is read, and it must be floating point and finite."""
    with open_npz(path, error=BadFileError, hint=" (not written by save_adapters)") as archive:
        if ADAPTERS_KEY not in archive.files:
            raise BadFileError(f"{path}: no {ADAPTERS_KEY} entry, so not written by save_adapters")
        meta = parse_json(str(archive[ADAPTERS_KEY][()]), f"{path}: {ADAPTERS_KEY}", BadFileError)
        if not _is_metadata(meta):
            raise BadFileError(f"{path}: damaged adapters file (metadata is not {ADAPTERS_FORMAT})")
        try:
            check_hyperparameters(meta["rank"], meta["alpha"])
            check_rank_fits(meta["rank"], meta["base"]["shapes"])
        except ValueError as e:
            raise BadFileError(f"{path}: {e}") from None
        rank, stored = meta["rank"], set(archive.files) - {ADAPTERS_KEY}
        expected = {f"{layer}.{name}": shape for layer, (C, OC) in meta["base"]["shapes"].items()
                    for name, shape in (("lora_A", (C, rank)), ("lora_B", (rank, OC)))}
        if stored != expected.keys():
            odd = sorted(stored ^ expected.keys())[0]
            problem = "missing" if odd in expected else "unexpected"
            raise BadFileError(f"{path}: damaged adapters file ({odd} is {problem})")
        for name, shape in expected.items():
            if archive.header(name)[0] != shape:
                raise BadFileError(f"{path}: {name} has shape {archive.header(name)[0]}, expected {shape}")
        arrays = {name: check_float_parameter(path, name, archive[name]) for name in expected}
    return meta, arrays


def _is_metadata(meta):
    """Whether `meta` is save_adapters' metadata, with the types load_adapters relies on."""
    if not (isinstance(meta, dict) and meta.get("format") == ADAPTERS_FORMAT
            and {"rank", "alpha", "layers", "base"} <= meta.keys()):
        return False
    layers, base = meta["layers"], meta["base"]
    return (isinstance(layers, list) and len(layers) > 0 and all(isinstance(layer, str) for layer in layers)
            and isinstance(base, dict) and {"shapes", "config", "fingerprint"} <= base.keys()
            and (base["config"] is None or isinstance(base["config"], dict))
            and isinstance(base["shapes"], dict) and set(layers) == set(base["shapes"])
            and all(_is_shape(shape) for shape in base["shapes"].values()))


def _base_identity(model):
    """What identifies the base: each linear layer's (C, OC), the GPTConfig, a CRC-32 of its weights."""
    cfg = getattr(model, "cfg", None)
    shapes = {path: list(layer.weight.shape) for path, _, _, layer in lora_layers(model)}
    return {"shapes": shapes, "config": None if cfg is None else dataclasses.asdict(cfg),
            "fingerprint": weights_fingerprint(model)}


def _check_base(model, meta):
    """A ValueError unless `model` is the base the adapters were trained on (its config, layers, weights)."""
    base = meta["base"]
    cfg = getattr(model, "cfg", None)
    ours = None if cfg is None else dataclasses.asdict(cfg)
    if base["config"] is not None and ours is not None:
        for key, value in base["config"].items():
            if key != "drop_rate" and ours.get(key) != value:
                raise ValueError(f"adapters for a different base: theirs has {key} {value}, "
                                 f"this model {ours.get(key)}")
    linears = {path: layer for path, _, _, layer in layers_of(model, Linear)}
    for layer, shape in base["shapes"].items():
        if layer not in linears:
            raise ValueError(f"adapters for a different base: this model has no linear layer {layer}")
        if list(linears[layer].weight.shape) != shape:
            raise ValueError(f"adapters for a different base: layer {layer} is {tuple(shape)} in theirs, "
                             f"{linears[layer].weight.shape} here")
    if weights_fingerprint(model) != base["fingerprint"]:
        raise ValueError("adapters for a different base: same shapes, but not the weights they were "
                         "trained on")


def _is_shape(value):
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value))
