"""LoRA: fine-tune a frozen model through small low-rank updates of its linear layers (Hu et al. 2021).

A linear layer x W + b (W of C x OC numbers) is frozen and learns only a rank-r correction:
    out = x W + b + (alpha / r) (x A) B,      A (C, r), B (r, OC),  r << min(C, OC)
B starts at zero, so training starts exactly at the base model; A starts random (as PyTorch's
nn.Linear), so B's first gradient, (alpha / r) (x A)^T dout, is not zero. Only A and B train:
for gpt2-small at r = 16 that is 2.4M numbers instead of 124M (Adam's state shrinks alike), and the
backward skips the frozen weights' gradient products x^T dout, a third of a linear layer's work.

    apply_lora(model, rank, alpha)     wrap the targeted Linear layers in LoRALinear, freeze the rest
    trainable_summary(model)           "trainable N of M (x%)"
    merge_lora / unmerge_lora          plain weights W + (alpha / r) A B for generation and export, and back
    (minigpt.files.adapters keeps A and B alone in a small file, with what identifies their base)

Shape letters as in functional.py (C, OC, N), plus r, the LoRA rank. In lora_linear, B is LoRA's
up-projection, not the batch size: leading axes are folded into N rows.
"""
import dataclasses
import math

import numpy as np

from .cpu.parallel import matmul, matmul_tn
from .nn import Linear, Module, Parameter
from .ops import as_float_tensor
from .tensor import Tensor

# Every linear layer of a GPT-2 block; the output head, tied to the token embedding, stays frozen.
DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_NAMES = ("lora_A", "lora_B")
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
    Plain twin: minigpt/plain_ops.py:lora_linear

    Leading axes are folded into rows, each product is one BLAS call, and scale multiplies only the
    narrow (N, r) arrays.
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
    check_plain(model)
    linears = list(layers_of(model, Linear))
    chosen = [(path, parent, attr, layer) for path, parent, attr, layer in linears
              if any(path == t or path.endswith("." + t) for t in targets)]
    for target in targets:
        if not any(path == target or path.endswith("." + target) for path, *_ in chosen):
            raise ValueError(f"LoRA target {target!r} matches no linear layer of the model "
                             f"(GPT-2's are {', '.join(DEFAULT_TARGETS)})")
    check_rank_fits(rank, {path: layer.weight.shape for path, _, _, layer in chosen})

    rng = rng if rng is not None else np.random.default_rng(0)
    for p in model.parameters():
        p.requires_grad = False
    for path, parent, attr, layer in chosen:
        setattr(parent, attr, LoRALinear(layer, rank, alpha, rng))
    return LoRAConfig(rank, alpha, tuple(path for path, *_ in chosen))


FLOAT32_MAX = float(np.finfo(np.float32).max)  # weights are float32: a larger scale is inf in them


def check_hyperparameters(rank, alpha):
    """A ValueError naming the problem unless rank is a positive integer and alpha a positive number whose
    scale alpha / rank a float32 can hold (True and False are refused as numbers, as JSON's true would
    otherwise count as 1)."""
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating))
            or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if alpha / rank > FLOAT32_MAX:
        raise ValueError(f"LoRA alpha {alpha:g} is too large to train: its scale alpha / rank overflows "
                         f"float32, the weights' type (at most {FLOAT32_MAX:.3g})")


def lora_config(model):
    """The LoRAConfig of a model with (unmerged) adapters; ValueError if it has none."""
    layers = lora_layers(model)
    first = layers[0][3]
    return LoRAConfig(first.rank, first.alpha, tuple(path for path, *_ in layers))


def trainable_summary(model):
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
    layers = lora_layers(model)
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


# ----------------------------------------------------------------------------- helpers

def check_rank_fits(rank, shapes):
    """A ValueError unless rank <= min(C, OC) for every layer; shapes: {path: (C, OC)}."""
    for path, (C, OC) in shapes.items():
        if rank > min(C, OC):
            raise ValueError(f"LoRA rank {rank} is larger than layer {path} ({C} -> {OC}): "
                             f"at most {min(C, OC)}")


def check_plain(model):
    if layers_of(model, LoRALinear) or hasattr(model, MERGED_ATTR):
        raise ValueError("the model already has LoRA adapters (merged or not); apply LoRA to a plain model")


def lora_layers(model):
    """layers_of(model, LoRALinear), or a ValueError when there are none."""
    layers = layers_of(model, LoRALinear)
    if not layers:
        hint = " (they are merged: call unmerge_lora first)" if hasattr(model, MERGED_ATTR) else ""
        raise ValueError(f"the model has no LoRA adapters{hint}")
    return layers


def is_adapter(name):
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def layers_of(model, cls):
    """(path, parent module, attribute name, layer) for every module attribute that is a `cls`."""
    found = []
    for parent_path, parent in model.named_modules():
        for attr, value in vars(parent).items():
            if isinstance(value, cls):
                found.append((f"{parent_path}.{attr}" if parent_path else attr, parent, attr, value))
    return found
