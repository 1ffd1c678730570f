"""GPT-2 weights in and out: Hugging Face checkpoints, minigpt's own .npz, and the hub download.

Parameters keep Hugging Face GPT-2's names (`wte.weight`, `h.0.attn.c_attn.weight`, ...) and Linear
weights are stored (in, out) like HF's Conv1D, so loading is a copy without renames or transposes.
The work here is checking, as nanoGPT's `from_pretrained` does: every parameter must be present
once, with the right shape, and nothing may be left over; an error names the file and the tensor.

Two formats on disk:
- Hugging Face: `model.safetensors` + `config.json`, either as on the hub (openai-community/gpt2,
  names without prefix, possibly with the causal-mask buffers `h.{i}.attn.bias` and
  `h.{i}.attn.masked_bias`) or as transformers' `save_pretrained` writes it (names prefixed
  `transformer.`). The output head is tied to `wte.weight`: a stored `lm_head.weight` must equal
  it, since minigpt has no separate head to put a different one in.
- minigpt: one `.npz` with every parameter plus the GPTConfig as JSON under `__config__`.
Both keep the model card (files.model_card) when there is one: the .npz under `__card__`, config.json
under "minigpt", and a Hugging Face folder then also holds the tokenizer files (files.hf_tokenizer).
"""
import dataclasses
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np

from ..lora import is_adapter
from ..model import GPT2_PRESETS, GPTConfig, GPTModel, parameter_shapes
from ..nn import non_finite
from ..tokenizer import GPT2_EOT_ID
from .fileio import BadFileError, atomic_write, download_file, open_npz, parse_json, write_json
from .hf_tokenizer import write_tokenizer_files
from .safetensors import read_safetensors, read_safetensors_shapes, write_safetensors

# Preset name -> the Hugging Face hub repository holding its weights.
HUB_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# A module constant so tests can point downloads at a closed local port instead of the network.
HF_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
DOWNLOAD_TIMEOUT = 10  # seconds: without network, fail fast instead of hanging
CONFIG_KEY = "__config__"  # the .npz entry holding the GPTConfig as a JSON string
CARD_KEY = "__card__"      # ... and the model card as a JSON string (files.model_card), when there is one
HF_PREFIX = "transformer."  # save_pretrained nests GPT2Model inside GPT2LMHeadModel.transformer
HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
HF_CARD_KEY = "minigpt"  # config.json's entry holding the model card
NPZ_HINT = "; expected one written by minigpt (python -m minigpt.convert makes one from Hugging Face weights)"
# Activations equal to minigpt's GELU (the tanh approximation), under transformers' names.
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5
# Causal-mask constants older transformers saved with the weights; they are not parameters.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER_INDEX = re.compile(r"h\.(\d+)\.")


# ----------------------------------------------------------------------------- Hugging Face layout

def load_hf_gpt2(path, dtype=np.float32):
    """Load a Hugging Face GPT-2 checkpoint -> GPTModel.

    `path` is a directory holding `model.safetensors` (and optionally `config.json`), or the
    .safetensors file itself (a `config.json` beside it is used when present). The config is read
    off the tensor shapes; only the number of heads needs config.json's `n_head`, or else an
    (emb_dim, n_layers) that matches a GPT-2 preset.
    """
    weights_file = _hf_weights_file(path)
    hf_config = _read_hf_config(weights_file.parent / HF_CONFIG_NAME)
    tensors, _ = read_safetensors(weights_file)
    params = _hf_parameters(weights_file, tensors)
    cfg = _infer_config(weights_file, {name: value.shape for name, value in params.items()}, hf_config)
    model = GPTModel(cfg, dtype=dtype)
    model.load_arrays(params.keys(), params.__getitem__, source=weights_file, error=BadFileError)
    return model


def read_hf_gpt2_config(path):
    """The GPTConfig of a Hugging Face GPT-2 checkpoint (as load_hf_gpt2 takes it), from its safetensors
    header and config.json alone: no tensor is read, so a run can estimate its memory before loading."""
    weights_file = _hf_weights_file(path)
    hf_config = _read_hf_config(weights_file.parent / HF_CONFIG_NAME)
    shapes = {}
    for name, shape in read_safetensors_shapes(weights_file).items():
        short = name.removeprefix(HF_PREFIX)
        if not _MASK_BUFFER.fullmatch(short):  # causal-mask buffers, as _hf_parameters drops them
            shapes[short] = shape
    return _infer_config(weights_file, shapes, hf_config)


def _hf_weights_file(path):
    """The .safetensors file of a Hugging Face checkpoint: `path` itself, or the model.safetensors in it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    weights_file = path / HF_WEIGHTS_NAME if path.is_dir() else path
    if not weights_file.exists():
        raise FileNotFoundError(f"{path}: no {HF_WEIGHTS_NAME} in this directory (minigpt reads "
                                f"safetensors checkpoints, not pytorch_model.bin)")
    return weights_file


def save_hf_gpt2(model, path, card=None, tokenizer=None):
    """Write `model` as a Hugging Face GPT-2 checkpoint that `GPT2LMHeadModel.from_pretrained` loads.

    `path` is a directory (gets `model.safetensors` + `config.json`) or a .safetensors file (gets
    `config.json` beside it). Tensors are float32 with the hub's unprefixed names. HF GPT-2 always
    has query/key/value biases, so a model without them is written with zero biases: the outputs
    are identical, and it loads back with qkv_bias=True. With `card` (files.model_card), config.json
    keeps it under "minigpt"; with `tokenizer` too (the card's), the folder gets the tokenizer files and
    the chat template (files.hf_tokenizer), so that transformers talks to the model as minigpt does.
    Returns the weights file's path.
    """
    path = Path(path)
    weights_file = path if path.suffix == ".safetensors" else path / HF_WEIGHTS_NAME
    cfg = model.cfg
    tensors = {name: np.asarray(value, dtype=np.float32) for name, value in model.state_dict().items()}
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            tensors[f"h.{i}.attn.c_attn.bias"] = np.zeros(3 * cfg.emb_dim, np.float32)  # (3C,)
    write_safetensors(weights_file, tensors)
    hf_config = hf_config_dict(cfg)
    write_json(weights_file.parent / HF_CONFIG_NAME, {**hf_config, HF_CARD_KEY: card} if card else hf_config)
    if tokenizer is not None:
        write_tokenizer_files(weights_file.parent, tokenizer, card["prompt_style"], cfg.context_length)
    return weights_file


def hf_config_dict(cfg):
    """GPTConfig -> the config.json of a transformers GPT2LMHeadModel with the same architecture."""
    eot_id = GPT2_EOT_ID if cfg.vocab_size > GPT2_EOT_ID else None  # a small vocab has no GPT-2 EOT
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # None means 4 * n_embd, minigpt's MLP width
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


def _read_hf_config(config_file):
    """config.json -> dict ({} when absent), refusing architectures minigpt computes differently."""
    if not config_file.is_file():
        return {}
    hf_config = parse_json(config_file.read_bytes(), config_file, BadFileError)
    if not isinstance(hf_config, dict):
        raise BadFileError(f"{config_file}: not a JSON object")
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise BadFileError(f"{config_file}: activation_function {activation!r} is not supported; "
                           f"minigpt implements GELU with the tanh approximation ({HF_ACTIVATIONS[0]})")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf_config.get(key, supported) != supported:
            raise BadFileError(f"{config_file}: {key}={hf_config[key]} is not supported; minigpt "
                               f"scales attention scores by 1/sqrt(head size) in every layer")
    eps = hf_config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        raise BadFileError(f"{config_file}: layer_norm_epsilon {eps} is not supported; "
                           f"minigpt uses {LAYER_NORM_EPS}")
    return hf_config


def _hf_parameters(weights_file, tensors):
    """HF tensor names -> minigpt's: strip `transformer.`, drop mask buffers, check a tied lm_head."""
    params = {}
    for name, value in tensors.items():
        short = name.removeprefix(HF_PREFIX)
        if _MASK_BUFFER.fullmatch(short):
            continue
        check_float_parameter(weights_file, name, value)
        if short in params:
            raise BadFileError(f"{weights_file}: tensor {short} is stored twice "
                               f"(with and without the {HF_PREFIX!r} prefix)")
        params[short] = value
    head = params.pop("lm_head.weight", None)
    wte = params.get("wte.weight")
    if head is not None and not (wte is not None and head.shape == wte.shape and np.array_equal(head, wte)):
        raise BadFileError(f"{weights_file}: lm_head.weight differs from wte.weight; minigpt ties "
                           f"the output head to the token embedding and cannot load a separate head")
    return params


def check_float_parameter(source, name, array):
    """`array`, unless it cannot be a parameter: an integer or bool dtype (same byte count, so it would
    be cast to floats without a word) or NaN or inf values (they would spread to every output)."""
    if not np.issubdtype(array.dtype, np.floating):
        raise BadFileError(f"{source}: tensor {name} has dtype {array.dtype}, but a parameter must be "
                           f"floating point (F32, F16, BF16 or F64)")
    bad = non_finite(array)
    if bad is not None:
        count, first = bad
        values = "1 non-finite value" if count == 1 else f"{count} non-finite values"
        raise BadFileError(f"{source}: tensor {name} holds {values} (NaN or inf; the first at index "
                           f"{first})")
    return array


def weights_fingerprint(model):
    """CRC-32 over the names and float32 values of every parameter but LoRA's adapters: what identifies a
    model's weights (the base of adapters, the reference model of a DPO run).

    float32 because checkpoints are: the same weights loaded in float64 have the same fingerprint.
    """
    crc = 0
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not is_adapter(name):
            crc = zlib.crc32(name.encode(), crc)
            crc = zlib.crc32(np.ascontiguousarray(p.data, dtype=np.float32), crc)
    return crc


def _infer_config(weights_file, shapes, hf_config):
    """Read the GPTConfig off the tensors' shapes ({name: shape}, minigpt's names); n_heads from
    config.json or a matching preset."""
    for name in ("wte.weight", "wpe.weight"):
        if name not in shapes:
            raise BadFileError(f"{weights_file}: missing tensor {name}; not a GPT-2 checkpoint")
        if len(shapes[name]) != 2:
            raise BadFileError(f"{weights_file}: tensor {name} has shape {tuple(shapes[name])}, "
                               f"expected 2 dimensions")
    vocab_size, emb_dim = shapes["wte.weight"]  # (V, C)
    context_length = shapes["wpe.weight"][0]
    # Counting distinct indices (not max + 1) keeps a gap, h.0 h.1 h.3, reported as a missing h.2.
    n_layers = len({int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.match(name))})
    if n_layers == 0:
        raise BadFileError(f"{weights_file}: no transformer blocks (tensors h.0.*); "
                           f"not a GPT-2 checkpoint")
    config_file = weights_file.parent / HF_CONFIG_NAME
    for key, value in (("vocab_size", vocab_size), ("n_positions", context_length),
                       ("n_embd", emb_dim), ("n_layer", n_layers)):
        if key in hf_config and hf_config[key] != value:
            raise BadFileError(f"{config_file}: {key} is {hf_config[key]} but the weights in "
                               f"{weights_file.name} have {value}")
    n_heads = hf_config.get("n_head") or _preset_n_heads(emb_dim, n_layers)
    if n_heads is None:
        raise BadFileError(f"{weights_file}: cannot tell the number of attention heads (emb_dim "
                           f"{emb_dim} with {n_layers} layers is no GPT-2 preset); put the checkpoint's "
                           f"{HF_CONFIG_NAME}, which has n_head, next to it")
    try:
        return GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                         n_heads=n_heads, n_layers=n_layers, qkv_bias="h.0.attn.c_attn.bias" in shapes)
    except ValueError as e:  # e.g. n_head does not divide n_embd
        raise BadFileError(f"{weights_file}: {e}") from None


def _preset_n_heads(emb_dim, n_layers):
    for preset in GPT2_PRESETS.values():
        if (preset["emb_dim"], preset["n_layers"]) == (emb_dim, n_layers):
            return preset["n_heads"]
    return None


# ----------------------------------------------------------------------------- minigpt's .npz

def save_npz(model, path, card=None):
    """Write every parameter plus the config (JSON under `__config__`) to one .npz, atomically; with
    `card` (files.model_card.make_card), also how to talk to the model (JSON under `__card__`)."""
    arrays = dict(model.state_dict())
    arrays[CONFIG_KEY] = np.array(json.dumps(dataclasses.asdict(model.cfg)))  # 0-d unicode: no pickle
    if card is not None:
        arrays[CARD_KEY] = np.array(json.dumps(card))
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def load_npz(path, dtype=np.float32):
    """Load a .npz written by `save_npz` -> GPTModel (never unpickles anything).

    The stored config is checked against the arrays' .npy headers before the model is built, so a
    config claiming a million layers costs nothing; see load_npz_arrays for the arrays themselves.
    """
    with open_npz(path, error=BadFileError, hint=NPZ_HINT) as archive:
        cfg = _npz_config(path, archive)
        check_stored_shapes(path, archive.shapes(), cfg)
        model = GPTModel(cfg, dtype=dtype)
        load_npz_arrays(model, archive)
    return model


def load_npz_arrays(model, archive, prefix=""):
    """Copy the arrays of an open .npz (archive: fileio.NpzArchive) into `model`'s parameters; with
    `prefix`, only the entries named prefix + parameter name. Every shape is checked from the headers
    before any array is read, and each array must be floating point and finite (check_float_parameter).
    """
    names = [name.removeprefix(prefix) for name in archive.files
             if name.startswith(prefix) and name not in (CONFIG_KEY, CARD_KEY)]
    shapes = {name: archive.header(prefix + name)[0] for name in names}
    model.load_arrays(names, lambda name: check_float_parameter(archive.path, name, archive[prefix + name]),
                      source=archive.path, error=BadFileError, shapes=shapes)


def check_stored_shapes(path, shapes, cfg):
    """Raise BadFileError unless every parameter of GPTModel(cfg) is among the stored `shapes`
    ({name: shape}, from an .npz's headers: NpzArchive.shapes) with its shape, before the model is
    allocated. Entries the config does not imply are left to load_arrays to report."""
    for name, shape in parameter_shapes(cfg):
        stored = shapes.get(name)
        if stored is None:
            raise BadFileError(f"{path}: missing tensor {name}, which the stored config "
                               f"({_config_text(cfg)}) implies")
        if stored != shape:
            raise BadFileError(f"{path}: tensor {name} has shape {stored}, but the stored config implies "
                               f"{shape} ({_config_text(cfg)})")


def _config_text(cfg):
    return ", ".join(f"{key} {value}" for key, value in dataclasses.asdict(cfg).items() if key != "drop_rate")


def read_npz_config(path):
    """The GPTConfig of a .npz written by `save_npz`, without reading its weights."""
    with open_npz(path, error=BadFileError, hint=NPZ_HINT) as archive:
        return _npz_config(path, archive)


def read_npz_card(path):
    """The model card of a .npz written by `save_npz` (a dict, unchecked), without reading its weights;
    None when it has none (written before cards, or without one)."""
    with open_npz(path, error=BadFileError, hint=NPZ_HINT) as archive:
        if CARD_KEY not in archive.files:
            return None
        return parse_json(str(archive[CARD_KEY][()]), f"{path}: {CARD_KEY}", BadFileError)


def _npz_config(path, archive):
    if CONFIG_KEY not in archive.files:
        raise BadFileError(f"{path}: no {CONFIG_KEY} entry, so not written by minigpt's save_npz")
    stored = archive[CONFIG_KEY]  # a 0-d unicode array
    fields = parse_json(str(stored[()]), f"{path}: {CONFIG_KEY}", BadFileError)
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as e:  # not an object, unknown fields, invalid values
        raise BadFileError(f"{path}: {CONFIG_KEY} is not a valid GPTConfig ({e})") from None


# ----------------------------------------------------------------------------- by file name

def weights_format(path):
    """'npz' for a .npz path; 'hf' for a .safetensors file or a directory (existing or to be made)."""
    path = Path(path)
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors" or path.is_dir() or not path.suffix:
        return "hf"
    raise BadFileError(f"{path}: expected a .npz file, a .safetensors file or a directory "
                       f"holding {HF_WEIGHTS_NAME}")


def read_weights_config(path):
    """The GPTConfig of a weights file load_weights would load, without reading its weights."""
    if weights_format(path) == "npz":
        return read_npz_config(path)
    return read_hf_gpt2_config(path)


def load_weights(path, dtype=np.float32):
    """Load a model from a .npz (minigpt), a .safetensors file or a Hugging Face directory."""
    if weights_format(path) == "npz":
        return load_npz(path, dtype)
    return load_hf_gpt2(path, dtype)


def save_weights(model, path, card=None, tokenizer=None):
    """Write `model` to a .npz (minigpt) or as Hugging Face (.safetensors file or directory), with its
    `card` (and for Hugging Face its `tokenizer`'s files) when given: see save_npz, save_hf_gpt2."""
    if weights_format(path) == "npz":
        return save_npz(model, path, card)
    return save_hf_gpt2(model, path, card, tokenizer)


# ----------------------------------------------------------------------------- downloads

def download_gpt2(name, directory="data"):
    """Fetch OpenAI's GPT-2 `name` from the Hugging Face hub into `directory/name/` -> that folder.

    Files already there are reused: downloads are atomic, so a file that exists is complete.
    """
    repo = _hub_repo(name)
    target = Path(directory) / name
    weights_url = HF_URL.format(repo=repo, filename=HF_WEIGHTS_NAME)
    hint = (f"Without network access, fetch {weights_url} on another machine and pass it with "
            f"--weights PATH (a {HF_WEIGHTS_NAME}, a directory holding one, or a .npz).")
    for filename in (HF_CONFIG_NAME, HF_WEIGHTS_NAME):  # the small file first: no network fails fast
        if not (target / filename).is_file():
            download_file(HF_URL.format(repo=repo, filename=filename), target / filename,
                          timeout=DOWNLOAD_TIMEOUT, hint=hint)
    return target


def pretrained_gpt2(name, directory="data"):
    """OpenAI's GPT-2 `name` as a GPTModel, from the cached `directory/name.npz` when present.

    Otherwise downloads the Hugging Face checkpoint, converts it once and caches the .npz.
    """
    _hub_repo(name)  # reject an unknown name before it becomes part of a path
    cached = Path(directory) / f"{name}.npz"
    if cached.is_file():
        return load_npz(cached)
    model = load_hf_gpt2(download_gpt2(name, directory))
    save_npz(model, cached)
    print(f"converted {name} to {cached}", file=sys.stderr)
    return model


def _hub_repo(name):
    if name not in HUB_REPOS:
        raise ValueError(f"unknown GPT-2 model {name!r}; choose one of {', '.join(HUB_REPOS)}")
    return HUB_REPOS[name]
