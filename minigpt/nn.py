"""Modules: objects that own Parameters and apply ops from functional.py to their inputs.

A Module finds its parameters by walking its attributes: a Parameter, a sub-Module, or a list of
Modules (named by position, as GPT-2's `h.0`, `h.1`, ...). The dotted path of attribute names is the
parameter's name, so a model whose attributes carry GPT-2's names loads GPT-2's checkpoints as they are.
"""
import collections
import contextlib

import numpy as np

from . import functional as F
from .tensor import Tensor


class Parameter(Tensor):
    """A tensor a module owns: a leaf that requires a gradient, unless frozen.

    Freeze it with `p.requires_grad = False` (LoRA freezes the base model this way): every op then
    skips its gradient, and `parameters(trainable_only=True)`, what an optimizer is given, leaves it out.
    """

    def __init__(self, data):
        data = np.asarray(data)
        if not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"a Parameter must hold floating-point data, got dtype {data.dtype}")
        super().__init__(data, requires_grad=True)


def non_finite(array):
    """None if every value of `array` is finite, else (how many are NaN or inf, the first one's index).

    A NaN or inf makes the sum NaN or inf, so a finite sum clears the array at the cost of one pass
    (0.03 s for gpt2-small's 124M values) and no temporary array; an infinite one may be an overflow
    of large finite values, so the values themselves decide.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):
            return None
    bad = np.argwhere(~np.isfinite(array))
    return (len(bad), tuple(int(i) for i in bad[0])) if len(bad) else None


@contextlib.contextmanager
def eval_mode(model):
    """Run the block with `model` in eval mode (no dropout), then put back the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Module:
    training = True  # switched by train() / eval(); read by Dropout

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def named_modules(self, prefix=""):
        """(name, module) for self and every module below it, depth first, in attribute order."""
        yield prefix.rstrip("."), self
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}{name}.")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_modules(f"{prefix}{name}.{i}.")

    def named_parameters(self, trainable_only=False):
        """(name, Parameter) pairs such as ('h.0.attn.c_attn.weight', ...), each Parameter once;
        with trainable_only, only those that are not frozen."""
        seen = set()
        for module_name, module in self.named_modules():
            for name, value in vars(module).items():
                if (isinstance(value, Parameter) and id(value) not in seen
                        and (value.requires_grad or not trainable_only)):
                    seen.add(id(value))
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self, trainable_only=False):
        return [p for _, p in self.named_parameters(trainable_only)]

    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def state_dict(self):
        """{name: the parameter's live NumPy array}."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy {name: array} into the parameters, with load_arrays' checks (errors are ValueErrors)."""
        self.load_arrays(state.keys(), state.__getitem__)

    def load_arrays(self, names, fetch, source="state", error=ValueError, shapes=None):
        """Copy the arrays `names` into the parameters of the same name (cast to their dtype).

        `fetch(name)` returns one array; they are read and copied one at a time, so a large file is
        never held in memory beside the model. Every parameter must be named exactly once, with its
        exact shape, and no name may be left over. `shapes` ({name: shape}, e.g. from an .npz's
        headers) lets the shapes be checked before any array is read. An error is raised as `error`
        (e.g. weights.py's BadFileError) and names `source` (a file, or "state") and the tensor.
        """
        params, counts = dict(self.named_parameters()), collections.Counter(names)
        repeated = [name for name, count in counts.items() if count > 1]
        if repeated:
            raise error(f"{source}: tensor {repeated[0]} is given more than once")
        missing = [name for name in params if name not in counts]
        if missing:
            raise error(f"{source}: missing tensor {missing[0]}{_and_more(missing)}")
        unexpected = sorted(counts.keys() - params.keys())
        if unexpected:
            raise error(f"{source}: unexpected tensor {unexpected[0]}{_and_more(unexpected)} is not a "
                        f"parameter of this model")
        if shapes is not None:
            for name, param in params.items():
                _check_shape(source, name, shapes[name], param.shape, error)
        for name, param in params.items():
            value = np.asarray(fetch(name))
            _check_shape(source, name, value.shape, param.shape, error)
            param.data[...] = value


def _check_shape(source, name, shape, expected, error):
    if tuple(shape) != expected:
        raise error(f"{source}: tensor {name} has shape {tuple(shape)}, expected {expected}")


def _and_more(names):
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


class Linear(Module):
    """y = x @ weight + bias, weight stored (in_features, out_features) as GPT-2's checkpoints store it."""

    def __init__(self, in_features, out_features, bias=True, rng=None, std=0.02, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = Parameter((rng.standard_normal((in_features, out_features)) * std).astype(dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_parameters(cls, weight, bias=None):
        """A Linear around existing Parameters, shared rather than copied (LoRA's merge builds one)."""
        layer = cls.__new__(cls)
        layer.weight, layer.bias = weight, bias
        return layer

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    """A table of num_embeddings vectors of size dim, looked up by integer id."""

    def __init__(self, num_embeddings, dim, rng=None, std=0.02, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = Parameter((rng.standard_normal((num_embeddings, dim)) * std).astype(dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LayerNorm(Module):
    """Normalize the last axis to zero mean and unit variance, then scale and shift (learned)."""

    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        self.eps = eps
        self.weight = Parameter(np.ones(dim, dtype=dtype))
        self.bias = Parameter(np.zeros(dim, dtype=dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Zero activations with probability p while training; the identity in eval mode."""

    def __init__(self, p, rng):
        self.p = p
        self.rng = rng  # a shared np.random.Generator: the model's dropout stream, saved in checkpoints

    def forward(self, x):
        return F.dropout(x, self.p, self.rng, training=self.training)
