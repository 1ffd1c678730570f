"""LoRA: fine-tune a frozen model through small low-rank updates of its linear layers (Hu et al. 2021).

A linear layer x W + b (W of C x OC numbers) is frozen and learns only a rank-r correction:
    out = x W + b + (alpha / r) (x A) B,      A (C, r), B (r, OC),  r << min(C, OC)
B starts at zero, so training starts exactly at the base model; A starts random (as PyTorch's
nn.Linear), so B's first gradient, (alpha / r) (x A)^T dout, is not zero. Only A and B train:
for gpt2-small at r = 16 that is 2.4M numbers instead of 124M (Adam's state shrinks alike), and the
backward skips the frozen weights' gradient products x^T dout, a third of a linear layer's work.

    apply_lora(model, rank, alpha)     wrap the targeted Linear layers in LoRALinear, freeze the rest
    describe(model)                    "trainable N of M (x%)"
    merge_lora / unmerge_lora          plain weights W + (alpha / r) A B for generation and export, and back
    save_adapters / load_adapters      A and B alone in a small .npz, with what identifies their base
    copy_adapters                      put a file's A and B back into the same LoRA layers

Shape letters as in functional.py (C, OC, N), plus r, the LoRA rank. In lora_linear, B is LoRA's
up-projection, not the batch size: leading axes are folded into N rows.
"""
import dataclasses
import json
import math
import zlib
from pathlib import Path

import numpy as np

from .fileio import atomic_write, open_npz, parse_json
from .nn import Linear, Module, Parameter
from .ops import as_float_tensor
from .parallel import matmul, matmul_tn
from .safetensors import CheckpointError
from .tensor import Tensor
from .weights import check_float_parameter

# Every linear layer of a GPT-2 block; the output head, tied to the token embedding, stays frozen.
DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_NAMES = ("lora_A", "lora_B")
ADAPTERS_KEY = "__lora__"            # the .npz entry holding the JSON metadata
ADAPTERS_FORMAT = "minigpt-lora-1"
MERGED_ATTR = "merged_lora_layers"   # set on a merged model: {layer path: (parent, LoRALinear)}


def lora_linear(x, weight, bias, A, B, scale):
    """An affine map with frozen weights plus a trainable low-rank update (LoRA).

    Forward:  out = x @ W + b + scale * (x @ A) @ B,   scale = alpha / r
    Shapes:   x (..., C), W (C, OC), b (OC,) or None, A (C, r), B (r, OC) -> out (..., OC)
    Backward: dx = dout @ W^T + scale * (dout @ B^T) @ A^T
              dA = scale * x^T @ (dout @ B^T)
              dB = scale * (x @ A)^T @ dout
              W and b are frozen: no gradient, and their products x^T @ dout and sum(dout) are skipped.
    Cache:    x; scale * (x @ A) (N, r) from the forward, which is dB's left factor

    The plain twin is linear(x, W + scale A B, b) (tests/test_lora.py). Leading axes are folded into
    rows, each product is one BLAS call, and scale multiplies only the narrow (N, r) arrays.
    """
    x = as_float_tensor("lora_linear", x)
    C, OC = weight.shape
    r = A.shape[-1]
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad=False); "
                         "use linear() to train them")
    if x.shape[-1] != C or A.shape != (C, r) or B.shape != (r, OC):
        raise ValueError(f"lora_linear: shapes do not fit out = x W + (x A) B: x {x.shape}, "
                         f"W {weight.shape}, A {A.shape}, B {B.shape}")
    scale = float(scale)  # a NumPy float64 scale would turn float32 activations into float64
    x2d = x.data.reshape(-1, C)                                   # (N, C)
    xA_scaled = scale * matmul(x2d, A.data)                       # (N, r)
    out = matmul(x2d, weight.data, None if bias is None else bias.data)  # (N, OC)
    out += matmul(xA_scaled, B.data)                              # (N, r) @ (r, OC) -> (N, OC)

    def backward(dout):
        dout2d = dout.reshape(-1, OC)                             # (N, OC)
        if x.requires_grad or A.requires_grad:
            dxA = scale * matmul(dout2d, B.data.T)                # (N, r): the gradient of x @ A
            if A.requires_grad:
                A.accumulate_grad(matmul_tn(x2d, dxA), owned=True)  # (C, r)
            if x.requires_grad:
                dx = matmul(dout2d, weight.data.T)                # (N, C)
                dx += matmul(dxA, A.data.T)
                x.accumulate_grad(dx.reshape(x.shape), owned=True)
        if B.requires_grad:
            B.accumulate_grad(matmul_tn(xA_scaled, dout2d), owned=True)  # (r, OC)
    return Tensor.from_op(out.reshape(*x.shape[:-1], OC), (x, A, B), backward)


class LoRALinear(Module):
    """A Linear whose weight and bias are frozen, plus trainable lora_A (C, r) and lora_B (r, OC).

    It holds the base layer's own Parameters under their names, so a LoRA model's parameters are
    GPT-2's (a base checkpoint still loads by name) plus `<layer>.lora_A` and `<layer>.lora_B`.
    """

    def __init__(self, base, rank, alpha, rng):
        C, OC = base.weight.shape
        self.weight, self.bias = base.weight, base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad = False
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # PyTorch's nn.Linear default, Kaiming-uniform with a = sqrt(5), for a (r, C) weight: the
        # bound is gain * sqrt(3 / fan_in) = sqrt(2 / (1 + 5)) * sqrt(3 / C) = 1 / sqrt(C)
        bound = 1.0 / math.sqrt(C)
        self.lora_A = Parameter(rng.uniform(-bound, bound, size=(C, rank)).astype(base.weight.dtype))
        self.lora_B = Parameter(np.zeros((rank, OC), dtype=base.weight.dtype))  # start at the base model

    def forward(self, x):
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)

    def merged_weight(self):
        """W + (alpha / r) A B as a new array (C, OC); W is left as it is."""
        merged = self.lora_A.data @ self.lora_B.data              # (C, r) @ (r, OC) -> (C, OC): A B
        merged *= self.scale                                      # (alpha / r) A B
        merged += self.weight.data                                # W + (alpha / r) A B, built in place
        return merged


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    layers: tuple  # the wrapped layers' paths, such as 'h.0.attn.c_attn'

    @property
    def scale(self):
        return self.alpha / self.rank


def apply_lora(model, rank, alpha, targets=DEFAULT_TARGETS, rng=None):
    """Freeze every parameter of `model` and wrap its targeted Linear layers in LoRALinear, in place.

    targets: a layer is wrapped when its dotted path ends with a target ('mlp.c_fc' matches h.0.mlp.c_fc,
    h.1.mlp.c_fc, ...). rng: the np.random.Generator that draws every A (default: seed 0).
    Returns the LoRAConfig. Bad arguments raise ValueError before the model is touched.
    """
    check_hyperparameters(rank, alpha)
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of layer names, got {targets!r}")
    _check_plain(model)
    linears = list(_layers(model, Linear))
    chosen = [(path, parent, attr, layer) for path, parent, attr, layer in linears
              if any(path == t or path.endswith("." + t) for t in targets)]
    for target in targets:
        if not any(path == target or path.endswith("." + target) for path, *_ in chosen):
            raise ValueError(f"LoRA target {target!r} matches no linear layer of the model "
                             f"(GPT-2's are {', '.join(DEFAULT_TARGETS)})")
    _check_rank_fits(rank, {path: layer.weight.shape for path, _, _, layer in chosen})

    rng = rng if rng is not None else np.random.default_rng(0)
    for p in model.parameters():
        p.requires_grad = False
    for path, parent, attr, layer in chosen:
        setattr(parent, attr, LoRALinear(layer, rank, alpha, rng))
    return LoRAConfig(rank, alpha, tuple(path for path, *_ in chosen))


def check_hyperparameters(rank, alpha):
    """A ValueError naming the problem unless rank is a positive integer and alpha a positive number."""
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float, np.integer, np.floating)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")


def lora_config(model):
    """The LoRAConfig of a model with (unmerged) adapters; ValueError if it has none."""
    layers = _lora_layers(model)
    first = layers[0][3]
    return LoRAConfig(first.rank, first.alpha, tuple(path for path, *_ in layers))


def describe(model):
    """'trainable N of M (x%)': the parameters an optimizer would update, against all of them."""
    trainable = sum(p.size for p in model.parameters(trainable_only=True))
    total = sum(p.size for p in model.parameters())
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


# ----------------------------------------------------------------------------- merge and unmerge

def merge_lora(model):
    """Replace every LoRALinear by a plain Linear of weight W + (alpha / r) A B (frozen), in place.

    The merged model is a plain GPT-2 again: its state_dict holds GPT-2's names only, so save_npz,
    save_hf_gpt2 and generation use it as it is, at the speed of the base model.
    Design: each merged weight is a new array, and the LoRA layers, with W untouched, are kept aside
    (in `model.merged_lora_layers`) for unmerge_lora to put back exactly. Adding into W in place would
    save that memory (the targeted weights: 85M numbers, 340 MB in float32 for gpt2-small), but
    W + D - D is not W in floating point: a frozen base would drift by a rounding at each merge.
    """
    layers = _lora_layers(model)
    for path, parent, attr, layer in layers:
        weight = Parameter(layer.merged_weight())
        weight.requires_grad = False  # merging changes what the layer computes, not what trains
        setattr(parent, attr, Linear.from_parameters(weight, layer.bias))
    setattr(model, MERGED_ATTR, {path: (parent, layer) for path, parent, _, layer in layers})
    return model


def unmerge_lora(model):
    """Undo merge_lora: the LoRA layers, with their original W, A and B, come back bit for bit."""
    merged = getattr(model, MERGED_ATTR, None)
    if merged is None:
        raise ValueError("the model has no merged LoRA adapters to unmerge")
    for path, (parent, layer) in merged.items():
        setattr(parent, path.rsplit(".", 1)[-1], layer)
    delattr(model, MERGED_ATTR)
    return model


# ----------------------------------------------------------------------------- adapters on disk

def save_adapters(model, path):
    """Write A and B of every LoRA layer to one small .npz, atomically, with JSON metadata.

    Metadata: the rank, alpha, the layers' paths and what identifies the base: each layer's (C, OC),
    the model's GPTConfig and a CRC-32 of every base parameter, so the adapters never silently meet
    a different base.
    """
    config = lora_config(model)
    arrays = {name: p.data for name, p in model.named_parameters() if _is_adapter(name)}
    meta = {"format": ADAPTERS_FORMAT, "rank": int(config.rank), "alpha": float(config.alpha),
            "layers": list(config.layers), "base": _base_identity(model)}
    arrays[ADAPTERS_KEY] = np.array(json.dumps(meta))  # 0-d unicode: loads without pickle
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def load_adapters(model, path):
    """Apply LoRA to the plain `model` with the file's rank and alpha, and load its A and B.

    Everything is checked before the model is touched; a file that does not fit raises
    CheckpointError (a ValueError) with one line naming the file and the problem.
    """
    path = Path(path)
    meta, arrays = _read_adapters(path)
    try:
        _check_plain(model)
        _check_base(model, meta)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    apply_lora(model, meta["rank"], meta["alpha"], targets=meta["layers"])
    _copy_adapters(model, arrays)
    return lora_config(model)


def copy_adapters(model, path):
    """Copy A and B from an adapters file into `model`, which has LoRA layers of the same paths,
    rank and alpha already (a run's best adapters, put back). A file that does not fit raises a
    one-line CheckpointError and leaves the model untouched; the base is not checked (it is the
    model's own: the file came from a run on it)."""
    path = Path(path)
    meta, arrays = _read_adapters(path)
    ours = lora_config(model)
    theirs = LoRAConfig(meta["rank"], meta["alpha"], tuple(meta["layers"]))
    if theirs != ours:
        raise CheckpointError(f"{path}: adapters of rank {theirs.rank}, alpha {theirs.alpha:g} on "
                              f"{len(theirs.layers)} layers; the model's are rank {ours.rank}, alpha "
                              f"{ours.alpha:g} on {len(ours.layers)} layers")
    params = dict(model.named_parameters())
    for name, array in arrays.items():
        if array.shape != params[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {array.shape}, expected {params[name].shape}")
    _copy_adapters(model, arrays)


def _copy_adapters(model, arrays):
    for name, p in model.named_parameters():
        if _is_adapter(name):
            p.data[...] = arrays[name]


def _read_adapters(path):
    """(metadata, {name: array}) of an adapters .npz, or a one-line CheckpointError. Each array's shape is
    checked from its .npy header before it is read, and it must be floating point and finite."""
    with open_npz(path, error=CheckpointError, hint=" (not written by save_adapters)") as archive:
        if ADAPTERS_KEY not in archive.files:
            raise CheckpointError(f"{path}: no {ADAPTERS_KEY} entry, so not written by save_adapters")
        meta = parse_json(str(archive[ADAPTERS_KEY][()]), f"{path}: {ADAPTERS_KEY}", CheckpointError)
        if not _is_metadata(meta):
            raise CheckpointError(f"{path}: damaged adapters file (metadata is not {ADAPTERS_FORMAT})")
        try:
            check_hyperparameters(meta["rank"], meta["alpha"])
            _check_rank_fits(meta["rank"], meta["base"]["shapes"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        rank, stored = meta["rank"], set(archive.files) - {ADAPTERS_KEY}
        expected = {f"{layer}.{name}": shape for layer, (C, OC) in meta["base"]["shapes"].items()
                    for name, shape in (("lora_A", (C, rank)), ("lora_B", (rank, OC)))}
        if stored != expected.keys():
            odd = sorted(stored ^ expected.keys())[0]
            problem = "missing" if odd in expected else "unexpected"
            raise CheckpointError(f"{path}: damaged adapters file ({odd} is {problem})")
        for name, shape in expected.items():
            if archive.header(name)[0] != shape:
                raise CheckpointError(f"{path}: {name} has shape {archive.header(name)[0]}, expected {shape}")
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
    shapes = {path: list(layer.weight.shape) for path, _, _, layer in _lora_layers(model)}
    return {"shapes": shapes, "config": None if cfg is None else dataclasses.asdict(cfg),
            "fingerprint": _base_fingerprint(model)}


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
    linears = {path: layer for path, _, _, layer in _layers(model, Linear)}
    for layer, shape in base["shapes"].items():
        if layer not in linears:
            raise ValueError(f"adapters for a different base: this model has no linear layer {layer}")
        if list(linears[layer].weight.shape) != shape:
            raise ValueError(f"adapters for a different base: layer {layer} is {tuple(shape)} in theirs, "
                             f"{linears[layer].weight.shape} here")
    if _base_fingerprint(model) != base["fingerprint"]:
        raise ValueError("adapters for a different base: same shapes, but not the weights they were "
                         "trained on")


def _base_fingerprint(model):
    """CRC-32 over the names and float32 values of every base (non-adapter) parameter.

    float32 because checkpoints are: the same base loaded in float64 has the same fingerprint.
    """
    crc = 0
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not _is_adapter(name):
            crc = zlib.crc32(name.encode(), crc)
            crc = zlib.crc32(np.ascontiguousarray(p.data, dtype=np.float32), crc)
    return crc


def _is_shape(value):
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value))


def _check_rank_fits(rank, shapes):
    """A ValueError unless rank <= min(C, OC) for every layer; shapes: {path: (C, OC)}."""
    for path, (C, OC) in shapes.items():
        if rank > min(C, OC):
            raise ValueError(f"LoRA rank {rank} is larger than layer {path} ({C} -> {OC}): "
                             f"at most {min(C, OC)}")


def _check_plain(model):
    if _layers(model, LoRALinear) or hasattr(model, MERGED_ATTR):
        raise ValueError("the model already has LoRA adapters (merged or not); apply LoRA to a plain model")


def _lora_layers(model):
    """_layers(model, LoRALinear), or a ValueError when there are none."""
    layers = _layers(model, LoRALinear)
    if not layers:
        hint = " (they are merged: call unmerge_lora first)" if hasattr(model, MERGED_ATTR) else ""
        raise ValueError(f"the model has no LoRA adapters{hint}")
    return layers


def _is_adapter(name):
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def _layers(model, cls):
    """(path, parent module, attribute name, layer) for every module attribute that is a `cls`."""
    found = []
    for parent_path, parent in model.named_modules():
        for attr, value in vars(parent).items():
            if isinstance(value, cls):
                found.append((f"{parent_path}.{attr}" if parent_path else attr, parent, attr, value))
    return found
