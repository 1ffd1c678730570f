"""The autograd engine: a Tensor that remembers how it was made, and reverse-mode backward.

Every op (in ops.py and functional.py) computes its output with NumPy and, when gradients are
wanted, returns a Tensor holding its inputs (`parents`) and a closure `backward_fn(dout)` that adds
each input's gradient into `input.grad`. `Tensor.backward()` sorts the recorded graph topologically
and calls those closures from the loss back to the leaves, as micrograd does, but without recursion
so a 48-layer GPT-2 XL graph never hits Python's recursion limit.

Gradients accumulate, as in PyTorch: a tensor used twice (a diamond graph, the tied embedding and
output head) receives the sum of both gradients, and a parameter's `.grad` keeps adding up across
backward calls until it is zeroed. Backward closures never modify the `dout` they are given.
"""
import contextlib

import numpy as np


class _GradMode:
    """Whether ops record the graph; switched off by `no_grad()` for evaluation and generation."""
    enabled = True


@contextlib.contextmanager
def no_grad():
    """Within this block ops compute values only: no graph is recorded, nothing keeps activations."""
    previous = _GradMode.enabled
    _GradMode.enabled = False
    try:
        yield
    finally:
        _GradMode.enabled = previous


def is_grad_enabled():
    return _GradMode.enabled


def unbroadcast(grad, shape):
    """Sum `grad` over the axes NumPy broadcast, so it has the `shape` of the input it belongs to.

    Forward `a + b` with a (3, 1) and b (4,) gives (3, 4); each element of b was used 3 times and each
    element of a 4 times, so da = sum over axis 1 (keepdims), db = sum over axis 0.
    """
    if grad.shape == shape:
        return grad
    extra_leading = grad.ndim - len(shape)
    axes = tuple(range(extra_leading)) + tuple(
        extra_leading + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra_leading + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


class Tensor:
    """A NumPy array plus what autograd needs: `.grad`, `requires_grad`, and how it was computed.

    data:          np.ndarray, float32 by default (any float dtype works; ints only for constants)
    grad:          np.ndarray of data's shape, or None until a backward pass reaches this tensor
    requires_grad: whether backward should compute a gradient for this tensor
    """
    __array_priority__ = 100  # so `ndarray + Tensor` calls Tensor.__radd__ instead of NumPy's loop

    def __init__(self, data, requires_grad=False, parents=(), backward_fn=None):
        if not isinstance(data, np.ndarray):
            data = np.asarray(data)
            if data.dtype == np.float64:
                data = data.astype(np.float32)  # Python floats and lists default to float32, as torch
        if requires_grad and not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._parents = parents
        self._backward_fn = backward_fn

    @classmethod
    def from_op(cls, data, parents, backward_fn):
        """The output of an op: records parents and backward only when some input needs a gradient."""
        data = np.asarray(data)  # NumPy returns a 0-d result as a scalar, which __init__ would make float32
        if _GradMode.enabled and any(p.requires_grad for p in parents):
            return cls(data, requires_grad=True, parents=parents, backward_fn=backward_fn)
        return cls(data)

    # ----- properties ------------------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    is_leaf = property(lambda self: self._backward_fn is None)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def __len__(self):
        return len(self.data)

    def item(self):
        return self.data.item()

    def numpy(self):
        return self.data

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    # ----- autograd --------------------------------------------------------------------------------------
    def accumulate_grad(self, grad, owned=False):
        """Add `grad` into self.grad: called by the backward closures of the ops that used self.

        A leaf (parameter) keeps an array of its own and adds in place, so optimizers may modify it;
        `owned=True` says the op made `grad` for self alone, so the leaf may keep it without a copy.
        An intermediate stores what it is given (possibly shared: both inputs of `a + b` receive the
        same dout) and so adds out of place.
        """
        assert grad.shape == self.data.shape, f"gradient shape {grad.shape} != data shape {self.data.shape}"
        if self.grad is None:
            self.grad = np.array(grad, copy=True) if self.is_leaf and not owned else grad
        elif self.is_leaf:
            self.grad += grad
        else:
            self.grad = self.grad + grad

    def accumulate_grad_rows(self, rows, values):
        """Add values (n, ...) into the distinct rows of self.grad: a sparse gradient, an embedding's.

        For the token embedding (50257 rows) this touches the few rows a batch used instead of adding
        a 154 MB array that is almost all zeros.
        """
        if self.grad is not None and self.is_leaf:
            self.grad[rows] += values
        else:
            dense = np.zeros_like(self.data)
            dense[rows] = values
            self.accumulate_grad(dense, owned=True)

    def backward(self, grad=None, retain_graph=False):
        """Reverse-mode differentiation of self with respect to every tensor that requires a grad.

        grad: d(objective)/d(self), required unless self holds a single number (then 1).
        retain_graph: keep the recorded graph (and its saved activations) for another backward call;
        by default it is released as the pass walks it, which halves the peak memory of a training step.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                               "computation requires a gradient, it ran under no_grad(), or its graph was "
                               "released by an earlier backward() (pass retain_graph=True to go twice)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-number output, got shape "
                                   f"{self.shape}; pass grad= of that shape, or reduce (e.g. .sum()) first")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward(): grad has shape {grad.shape}, the tensor has shape {self.shape}")

        order = self._topological_order()
        self.accumulate_grad(grad)
        for node in reversed(order):
            if node.is_leaf or node.grad is None:
                continue
            node._backward_fn(node.grad)
            node.grad = None  # an intermediate's gradient is needed only until it reached its inputs
            if not retain_graph:
                node._parents, node._backward_fn = (), None
                node.requires_grad = False  # a released node is a constant, not a leaf to accumulate into

    def _topological_order(self):
        """Every tensor self depends on (that requires grad), inputs before the ops that used them.

        Iterative depth-first search: a node is appended after all of its parents were.
        """
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, parents_done = stack.pop()
            if parents_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if p.requires_grad and id(p) not in visited)
        return order

    # ----- operators: thin wrappers over minigpt.ops -----------------------------------------------------
    def __add__(self, other): return ops.add(self, other)
    def __radd__(self, other): return ops.add(other, self)
    def __sub__(self, other): return ops.sub(self, other)
    def __rsub__(self, other): return ops.sub(other, self)
    def __mul__(self, other): return ops.mul(self, other)
    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __neg__(self): return ops.neg(self)
    def __pow__(self, exponent): return ops.power(self, exponent)
    def __matmul__(self, other): return ops.matmul(self, other)
    def __rmatmul__(self, other): return ops.matmul(other, self)
    def __getitem__(self, index): return ops.getitem(self, index)

    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def reshape(self, *shape): return ops.reshape(self, shape[0] if len(shape) == 1 else shape)
    def transpose(self, axis1=-2, axis2=-1): return ops.transpose(self, axis1, axis2)
    def permute(self, *axes): return ops.permute(self, axes[0] if len(axes) == 1 else axes)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def tanh(self): return ops.tanh(self)

    @property
    def T(self):
        return ops.transpose(self, -2, -1)


from . import ops  # noqa: E402  (ops imports Tensor, so it is imported after the class exists)
