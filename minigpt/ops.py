"""Tensor math with hand-derived gradients: arithmetic, matmul, reductions, shapes, exp/log/tanh.

Each op is one function: the forward computes the output with NumPy; the nested `backward(dout)`
adds each input's gradient into `input.grad`. The docstring gives the formula (Forward), the shapes,
one gradient formula per input (Backward) and what the backward keeps from the forward (Cache).
`dout` is d(loss)/d(out); `dx` is d(loss)/d(x). Neural-network ops live in functional.py.

Letters used in the shapes below (the same as functional.py's):
    B  batch size              T  sequence length          C  channels (emb_dim)
    V  vocabulary size         NH number of heads          hs head size, C / NH
    OC output channels of a linear layer                   N  rows (B*T, or the rows a loss keeps)
These ops take any shape: `...` stands for any leading axes, and lower-case letters (n, k, m, L) for
sizes an op relates to each other. The examples use the letters: attention written with these plain
ops (instead of functional.py's fused one) would reshape, permute and split exactly so.
"""
import builtins

import numpy as np

from .cpu import parallel
from .tensor import Tensor, unbroadcast


# ----- input checks: one clear error instead of a NumPy traceback -------------------------------------------
def as_float_tensor(op, x):
    """x as a floating-point Tensor, or a TypeError naming the op."""
    if not isinstance(x, Tensor):
        x = Tensor(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{op} needs a floating-point tensor, got dtype {x.dtype}")
    return x


def _same_dtype_tensors(op, a, b):
    """Both operands as Tensors of one float dtype.

    A Python number takes the other operand's dtype; two arrays of different dtypes are an error
    rather than a silent float64 promotion.
    """
    if not isinstance(a, Tensor) and np.ndim(a) == 0 and isinstance(b, Tensor):
        a = Tensor(np.asarray(a, dtype=b.dtype))
    if not isinstance(b, Tensor) and np.ndim(b) == 0 and isinstance(a, Tensor):
        b = Tensor(np.asarray(b, dtype=a.dtype))
    a, b = as_float_tensor(op, a), as_float_tensor(op, b)
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: dtypes differ ({a.dtype} and {b.dtype}); convert one explicitly")
    return a, b


def _binary_inputs(op, a, b):
    """Both operands as Tensors of one float dtype, with shapes that broadcast."""
    a, b = _same_dtype_tensors(op, a, b)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None
    return a, b


# ----- elementwise arithmetic -------------------------------------------------------------------------------
def add(a, b):
    """Elementwise sum with broadcasting.

    Forward:  out = a + b
    Shapes:   a, b broadcastable -> out (their broadcast shape)
    Backward: da = unbroadcast(dout);  db = unbroadcast(dout)
    Cache:    nothing
    """
    a, b = _binary_inputs("add", a, b)

    def backward(dout):
        if a.requires_grad:
            a.accumulate_grad(unbroadcast(dout, a.shape))
        if b.requires_grad:
            b.accumulate_grad(unbroadcast(dout, b.shape))
    return Tensor.from_op(a.data + b.data, (a, b), backward)


def sub(a, b):
    """Elementwise difference with broadcasting.

    Forward:  out = a - b
    Shapes:   a, b broadcastable -> out
    Backward: da = unbroadcast(dout);  db = -unbroadcast(dout)
    Cache:    nothing
    """
    a, b = _binary_inputs("sub", a, b)

    def backward(dout):
        if a.requires_grad:
            a.accumulate_grad(unbroadcast(dout, a.shape))
        if b.requires_grad:
            b.accumulate_grad(-unbroadcast(dout, b.shape))
    return Tensor.from_op(a.data - b.data, (a, b), backward)


def mul(a, b):
    """Elementwise product with broadcasting.

    Forward:  out = a * b
    Shapes:   a, b broadcastable -> out
    Backward: da = unbroadcast(dout * b);  db = unbroadcast(dout * a)
    Cache:    a, b (the inputs themselves)
    """
    a, b = _binary_inputs("mul", a, b)

    def backward(dout):
        if a.requires_grad:
            a.accumulate_grad(unbroadcast(dout * b.data, a.shape))
        if b.requires_grad:
            b.accumulate_grad(unbroadcast(dout * a.data, b.shape))
    return Tensor.from_op(a.data * b.data, (a, b), backward)


def div(a, b):
    """Elementwise quotient with broadcasting.

    Forward:  out = a / b
    Shapes:   a, b broadcastable -> out
    Backward: da = unbroadcast(dout / b);  db = unbroadcast(-dout * out / b)   (d(a/b)/db = -a/b^2)
    Cache:    b, out
    """
    a, b = _binary_inputs("div", a, b)
    out = a.data / b.data

    def backward(dout):
        if a.requires_grad:
            a.accumulate_grad(unbroadcast(dout / b.data, a.shape))
        if b.requires_grad:
            b.accumulate_grad(unbroadcast(-dout * out / b.data, b.shape))
    return Tensor.from_op(out, (a, b), backward)


def neg(x):
    """Forward: out = -x.  Shapes: any.  Backward: dx = -dout.  Cache: nothing."""
    x = as_float_tensor("neg", x)
    return Tensor.from_op(-x.data, (x,), lambda dout: x.accumulate_grad(-dout))


def power(x, exponent):
    """x raised to a constant power.

    Forward:  out = x^p          (p a Python number; no gradient flows to p)
    Shapes:   x (any) -> out (same)
    Backward: dx = dout * p * x^(p-1)
    Cache:    x
    """
    x = as_float_tensor("power", x)
    if not isinstance(exponent, (int, float)):
        raise TypeError(f"power: the exponent must be a Python number, got {type(exponent).__name__}")

    def backward(dout):
        x.accumulate_grad(dout * exponent * x.data ** (exponent - 1))
    return Tensor.from_op(x.data ** exponent, (x,), backward)


def exp(x):
    """Forward: out = e^x.  Shapes: any.  Backward: dx = dout * out.  Cache: out."""
    x = as_float_tensor("exp", x)
    out = np.exp(x.data)
    return Tensor.from_op(out, (x,), lambda dout: x.accumulate_grad(dout * out))


def log(x):
    """Forward: out = ln(x).  Shapes: any.  Backward: dx = dout / x.  Cache: x."""
    x = as_float_tensor("log", x)
    return Tensor.from_op(np.log(x.data), (x,), lambda dout: x.accumulate_grad(dout / x.data))


def tanh(x):
    """Forward: out = tanh(x).  Shapes: any.  Backward: dx = dout * (1 - out^2).  Cache: out."""
    x = as_float_tensor("tanh", x)
    out = np.tanh(x.data)
    return Tensor.from_op(out, (x,), lambda dout: x.accumulate_grad(dout * (1 - out * out)))


# ----- matrix product ---------------------------------------------------------------------------------------
def matmul(a, b):
    """Matrix product, batched over leading axes.

    Forward:  out = a @ b
    Shapes:   a (..., n, k), b (k, m) or (..., k, m) -> out (..., n, m)
    Backward: da = dout @ b^T;  db = a^T @ dout, summed over the batch axes b was broadcast along
    Cache:    a, b

    With a 2-d b (a weight), the batch axes of a are folded into rows so each direction is a single
    BLAS call: db = a_2d^T @ dout_2d already sums over the batch.
    """
    a, b = _same_dtype_tensors("matmul", a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs at least 2-d operands, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align "
                         f"({a.shape[-1]} != {b.shape[-2]})")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch shapes of {a.shape} and {b.shape} cannot be broadcast") from None
    k = a.shape[-1]
    if b.ndim == 2:
        out = parallel.matmul(a.data.reshape(-1, k), b.data).reshape(*a.shape[:-1], b.shape[-1])
    else:
        out = a.data @ b.data

    def backward(dout):
        if b.ndim == 2:  # one product per direction, split over threads (see parallel.py)
            dout2d = dout.reshape(-1, b.shape[-1])
            if a.requires_grad:
                a.accumulate_grad(parallel.matmul(dout2d, b.data.T).reshape(a.shape))
            if b.requires_grad:
                b.accumulate_grad(parallel.matmul_tn(a.data.reshape(-1, k), dout2d))
            return
        if a.requires_grad:
            a.accumulate_grad(unbroadcast(dout @ np.swapaxes(b.data, -1, -2), a.shape))
        if b.requires_grad:
            b.accumulate_grad(unbroadcast(np.swapaxes(a.data, -1, -2) @ dout, b.shape))
    return Tensor.from_op(out, (a, b), backward)


# ----- reductions -------------------------------------------------------------------------------------------
def _normalized_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < ndim:
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(ax % ndim for ax in axes))


def _expand_reduced(dout, axes, shape, keepdims):
    """Broadcast a reduced gradient back to the input's shape (the backward of a sum)."""
    if not keepdims:
        dout = np.expand_dims(dout, axes)
    return np.broadcast_to(dout, shape)


def sum(x, axis=None, keepdims=False):
    """Sum over axes.

    Forward:  out = sum_axes(x)
    Shapes:   x (...) -> out (x's shape without `axis`, or with 1 there if keepdims)
    Backward: dx = dout broadcast back over the summed axes (each x element contributed once)
    Cache:    nothing
    """
    x = as_float_tensor("sum", x)
    axes = _normalized_axes(axis, x.ndim)
    out = x.data.sum(axis=axes, keepdims=keepdims)
    return Tensor.from_op(np.asarray(out), (x,),
                          lambda dout: x.accumulate_grad(_expand_reduced(dout, axes, x.shape, keepdims)))


def mean(x, axis=None, keepdims=False):
    """Mean over axes.

    Forward:  out = sum_axes(x) / n,  n = number of elements reduced
    Shapes:   as sum
    Backward: dx = dout / n, broadcast back over the reduced axes
    Cache:    nothing
    """
    x = as_float_tensor("mean", x)
    axes = _normalized_axes(axis, x.ndim)
    n = int(np.prod([x.shape[ax] for ax in axes]))
    out = x.data.mean(axis=axes, keepdims=keepdims)
    return Tensor.from_op(np.asarray(out), (x,),
                          lambda dout: x.accumulate_grad(_expand_reduced(dout / n, axes, x.shape, keepdims)))


# ----- shapes: reshape, transpose, permute, slicing, split, concat ------------------------------------------
def reshape(x, shape):
    """The same elements in a new shape.

    Forward:  out = x.reshape(shape)            e.g. (B, T, 3C) -> (B, T, 3, NH, hs)
    Shapes:   x (any) -> out (shape), the same number of elements
    Backward: dx = dout.reshape(x.shape)
    Cache:    nothing (x's shape)
    """
    x = as_float_tensor("reshape", x)
    try:
        out = x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape {x.shape} ({x.size} elements) "
                         f"into {tuple(shape)}") from None
    return Tensor.from_op(out, (x,), lambda dout: x.accumulate_grad(dout.reshape(x.shape)))


def transpose(x, axis1=-2, axis2=-1):
    """Swap two axes.

    Forward:  out = swapaxes(x, axis1, axis2)   e.g. k (B, NH, T, hs) -> k^T (B, NH, hs, T)
    Shapes:   x (..., n, m) -> out (..., m, n) with the default axes; any two axes in general
    Backward: dx = swapaxes(dout, axis1, axis2)  (a swap is its own inverse)
    Cache:    nothing (the two axes)
    """
    x = as_float_tensor("transpose", x)
    _normalized_axes((axis1, axis2), x.ndim)
    return Tensor.from_op(np.swapaxes(x.data, axis1, axis2), (x,),
                          lambda dout: x.accumulate_grad(np.swapaxes(dout, axis1, axis2)))


def permute(x, axes):
    """Reorder all axes.

    Forward:  out = x.transpose(axes)       e.g. (B, T, NH, hs) -> (B, NH, T, hs) with axes (0, 2, 1, 3)
    Shapes:   x (s_0, ..., s_n-1) -> out (s_axes[0], ..., s_axes[n-1])
    Backward: dx = dout.transpose(inverse of axes)
    Cache:    the inverse permutation
    """
    x = as_float_tensor("permute", x)
    axes = tuple(axes)
    if sorted(ax % x.ndim for ax in axes) != list(range(x.ndim)) or len(axes) != x.ndim:
        raise ValueError(f"permute: {axes} is not an ordering of the {x.ndim} axes of a tensor "
                         f"of shape {x.shape}")
    inverse = tuple(np.argsort([ax % x.ndim for ax in axes]))
    return Tensor.from_op(x.data.transpose(axes), (x,),
                          lambda dout: x.accumulate_grad(dout.transpose(inverse)))


def _selects_each_once(index):
    """True if the index cannot select an element twice: slices, integers, None and Ellipsis, or one
    strictly increasing integer array (such as np.flatnonzero's)."""
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) == 1 and isinstance(parts[0], np.ndarray) and parts[0].ndim == 1 \
            and np.issubdtype(parts[0].dtype, np.integer):
        return bool(np.all(parts[0][1:] > parts[0][:-1]))
    return all(isinstance(p, (slice, int, type(None), type(Ellipsis))) for p in parts)


def getitem(x, index):
    """Indexing and slicing, as NumPy's x[index].

    Forward:  out = x[index]
    Shapes:   x (...) -> out (whatever the index selects)
    Backward: dx = zeros like x, with dout added at the selected places; integer-array indices may
              select an element several times, and each use adds (np.add.at; an index that selects
              each element once, such as an increasing array, is a plain assignment)
    Cache:    the index
    """
    x = as_float_tensor("getitem", x)
    if isinstance(index, Tensor):
        index = index.data
    try:
        out = x.data[index]
    except IndexError as e:
        raise IndexError(f"getitem on a tensor of shape {x.shape}: {e}") from None

    def backward(dout):
        dx = np.zeros_like(x.data)
        if _selects_each_once(index):  # plain assignment; else np.add.at, 5x slower
            dx[index] = dout
        else:
            np.add.at(dx, index, dout)
        x.accumulate_grad(dx)
    return Tensor.from_op(out, (x,), backward)


def split(x, sections, axis=-1):
    """Cut x along `axis` into pieces of the given sizes (or into `sections` equal pieces).

    Forward:  pieces[i] = x[..., start_i:end_i, ...] along axis, start_i = the sizes before i summed
    Shapes:   x (..., L, ...) -> pieces[i] (..., size_i, ...), sum_i size_i = L
              e.g. qkv (B, T, 3C) -> q, k, v (B, T, C) each
    Backward: dx = each piece's gradient in its slice, zeros elsewhere (each piece is a getitem node,
              so the pieces' gradients add up in dx)
    Cache:    nothing of its own; each piece's getitem keeps its slice
    """
    x = as_float_tensor("split", x)
    length = x.shape[axis]
    if isinstance(sections, int):
        if length % sections:
            raise ValueError(f"split: axis of length {length} does not divide into {sections} equal pieces")
        sections = [length // sections] * sections
    if builtins.sum(sections) != length:
        raise ValueError(f"split: sizes {list(sections)} do not add up to the axis length {length}")
    ends = np.cumsum(sections)
    prefix = (slice(None),) * (axis % x.ndim)
    return [getitem(x, prefix + (slice(int(end - size), int(end)),)) for size, end in zip(sections, ends)]


def concat(tensors, axis=-1):
    """Join tensors along an existing axis.

    Forward:  out = [x_0, x_1, ...] along `axis`
    Shapes:   x_i equal except along axis -> out (sum of their lengths along axis)
    Backward: dx_i = the slice of dout that x_i occupies
    Cache:    where each x_i ends along axis (to cut dout apart)
    """
    tensors = [as_float_tensor("concat", t) for t in tensors]
    try:
        out = np.concatenate([t.data for t in tensors], axis=axis)
    except ValueError:
        raise ValueError(f"concat along axis {axis}: shapes {[t.shape for t in tensors]} "
                         f"do not fit") from None
    ends = np.cumsum([t.shape[axis] for t in tensors])

    def backward(dout):
        for t, piece in zip(tensors, np.split(dout, ends[:-1], axis=axis)):
            if t.requires_grad:
                t.accumulate_grad(piece)
    return Tensor.from_op(out, tuple(tensors), backward)
