"""Check hand-derived gradients against central finite differences, in float64.

    from minigpt import Tensor, gradcheck
    x = Tensor(np.random.randn(4, 5), requires_grad=True)   # float64 data
    gradcheck(lambda x: (x * x).tanh(), [x])          # raises GradcheckError on a wrong backward

The function may return a tensor of any shape: the checker differentiates the "fake loss"
L = sum(f(inputs) * dout) with a fixed random dout (llm.c's trick), so every output element counts
with its own weight. For each checked element x_i the numeric derivative is
    (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)
whose error is O(eps^2) plus float64 round-off of about 1e-16 |L| / eps.
"""
from dataclasses import dataclass

import numpy as np

from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with the finite-difference one."""


@dataclass
class GradcheckReport:
    max_relative_error: dict    # input name -> worst relative error over its checked elements
    checked: dict               # input name -> number of elements checked


def gradcheck(fn, inputs, eps=1e-6, rtol=1e-6, atol=1e-8, max_elements=64, seed=0):
    """Compare fn's backward with central differences; return a GradcheckReport or raise GradcheckError.

    fn:        fn(*inputs) -> Tensor when `inputs` is a list; with a dict {name: Tensor}, fn() is called
               without arguments (it closes over the tensors, e.g. a model's parameters).
    inputs:    float64 Tensors (NumPy arrays in a list are wrapped); those that require grad are checked.
    eps:       finite-difference step.
    rtol/atol: an element passes if its relative error |analytic - numeric| / max(|analytic|, |numeric|,
               atol / rtol) is at most rtol: relative for gradients of normal size, and an absolute
               tolerance atol for those so close to zero that round-off dominates.
    max_elements: per input, check at most this many elements (sampled with `seed`); None checks all.
    """
    named = _named_inputs(inputs)
    call = (lambda: fn()) if isinstance(inputs, dict) else (lambda: fn(*named.values()))
    rng = np.random.default_rng(seed)

    out = call()
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: the function must return a Tensor, got {type(out).__name__}")
    dout = rng.standard_normal(out.shape)

    def fake_loss():
        with no_grad():
            return float(np.sum(call().data * dout))

    for t in named.values():
        t.grad = None
    out.backward(dout)

    report = GradcheckReport({}, {})
    for name, t in named.items():
        if not t.requires_grad:
            continue
        analytic = np.zeros_like(t.data) if t.grad is None else t.grad
        flat_indices = np.arange(t.data.size)
        if max_elements is not None and t.data.size > max_elements:
            flat_indices = rng.choice(t.data.size, size=max_elements, replace=False)
        worst = 0.0
        for flat_index in flat_indices:
            index = np.unravel_index(flat_index, t.shape)
            original = t.data[index]
            t.data[index] = original + eps
            loss_plus = fake_loss()
            t.data[index] = original - eps
            loss_minus = fake_loss()
            t.data[index] = original
            numeric = (loss_plus - loss_minus) / (2 * eps)
            relative = abs(analytic[index] - numeric) / max(abs(analytic[index]), abs(numeric), atol / rtol)
            worst = max(worst, relative)
            if relative > rtol:
                raise GradcheckError(
                    f"gradcheck: gradient of {name} at index {tuple(int(i) for i in index)} is wrong: "
                    f"analytic {analytic[index]:.10g}, numeric {numeric:.10g} "
                    f"(relative error {relative:.2e} > rtol {rtol:g})")
        report.max_relative_error[name] = worst
        report.checked[name] = len(flat_indices)
    return report


def _named_inputs(inputs):
    """{name: float64 Tensor}; list entries are named 'input 0', 'input 1', ..."""
    items = inputs.items() if isinstance(inputs, dict) else ((f"input {i}", x) for i, x in enumerate(inputs))
    named = {}
    for name, x in items:
        if not isinstance(x, Tensor):
            if isinstance(inputs, dict):
                raise TypeError(f"gradcheck: {name} is a {type(x).__name__}, not a Tensor")
            x = Tensor(np.array(x, dtype=np.float64), requires_grad=True)
        if x.requires_grad and x.dtype != np.float64:
            raise TypeError(f"gradcheck: {name} has dtype {x.dtype}; finite differences need float64 "
                            f"(create the tensors, or the model, with dtype=np.float64)")
        named[name] = x
    return named
