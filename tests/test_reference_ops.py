"""Each fused op of minigpt/functional.py and losses.py against its plain twin in minigpt/plain_ops.py.

Value: the fused forward equals the plain NumPy formula. Gradient: the fused, hand-written backward
equals autograd through the twin written with minigpt's basic ops. Both in float64 to 1e-12 and in
float32 to a few times its round-off. The cases include the awkward inputs: ignored targets, rows of
huge or -inf-ish logits, a -inf score, constant rows, T = 1, one-channel heads, non-contiguous views.

CASES is the registry: op name -> cases, each a function of a Generator returning a Case.
test_every_fused_op_has_a_checked_twin fails when functional.py or losses.py gains an op without one here.
"""
import inspect
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from minigpt import plain_ops as ref
from minigpt import IGNORE_INDEX, Tensor, functional as F, losses

FUSED_MODULES = (F, losses)
# Public functions of functional.py and losses.py that need no twin here.
# Helpers of the attention ops, not ops themselves (the cached attention, inference only, is checked
# against the full forward in tests/test_model.py).
NO_TWIN = {"causal_mask", "split_heads", "softmax_rows_in_place", "kept_targets", "target_log_softmax_rows"}

# Measured worst cases: float64 2e-15 (values and gradients); float32 1e-7 (values), 5e-7 (gradients).
VALUE_RTOL = {np.float64: 1e-12, np.float32: 1e-6}
GRAD_RTOL = {np.float64: 1e-12, np.float32: 1e-5}


@dataclass
class Case:
    fused: Callable     # the op under test: Tensors in, a Tensor out
    plain: Callable     # its plain NumPy twin: arrays in, an array out
    basic: Callable     # its twin through minigpt's basic ops: Tensors in, a Tensor out
    arrays: list        # the float inputs, float64


def case(name, arrays, *args, view=None):
    """Case for the op `name`, each of its three versions called as fn(view(x), *other_inputs, *args).

    view (optional) turns the first input into a view of itself, e.g. a non-contiguous one. An op
    written with operators only has no separate basic-op twin: its plain twin is used as both.
    """
    def called(fn):
        return lambda x, *rest: fn(view(x) if view else x, *rest, *args)
    basic = getattr(ref, f"{name}_from_basic_ops", getattr(ref, name))
    fused = next(getattr(module, name) for module in FUSED_MODULES if hasattr(module, name))
    return Case(called(fused), called(getattr(ref, name)), called(basic), arrays)


def every_other(x):
    """Every other element of the last axis: a view with a stride of two elements."""
    return x[..., ::2]


def reversed_time(x):
    """The time axis backwards: a view with a negative stride."""
    return x[:, ::-1]


def randn(rng, *shape):
    return rng.standard_normal(shape)


def targets_with_ignored(rng, n_ignored, shape, V):
    """Random targets, n_ignored of them (at random places) set to IGNORE_INDEX."""
    targets = rng.integers(0, V, size=shape)
    targets.flat[rng.permutation(targets.size)[:n_ignored]] = IGNORE_INDEX
    return targets


def awkward_cross_entropy_case(rng, V=7):
    """(4, V) logits: a row near +1e4 (exp overflows unless shifted), one near -1e4 (-inf-ish),
    one whose target logit is 50 below the rest (a large loss), and an ordinary row."""
    logits = randn(rng, 4, V)
    logits[0] += 1e4
    logits[1] -= 1e4
    logits[2, 3] -= 50.0
    return case("cross_entropy", [logits], np.array([0, V - 1, 3, 2]))


def awkward_softmax_rows(rng, V=5):
    """(4, V): a row near +1e3 (exp overflows unless shifted), one near -1e4, a constant row, and a
    row holding one -inf (a masked entry: probability 0, gradient 0)."""
    x = randn(rng, 4, V)
    x[0] += 1e3
    x[1] -= 1e4
    x[2] = 0.5
    x[3, 1] = -np.inf
    return x


def awkward_layer_norm_rows(rng, C=6):
    """(4, C): an offset of 1e3 over a unit spread, a constant row (variance 0), a variance of 1e-8
    (far below eps, which then sets the scale), and an ordinary row."""
    x = randn(rng, 4, C)
    x[0] += 1e3
    x[1] = 2.5
    x[2] *= 1e-4
    return x


def attention_case(rng, B, T, NH, hs, scale=1.0, view=None):
    C3 = 3 * NH * hs                                                # qkv (B, T, 3C)
    qkv = scale * randn(rng, B, T, C3 if view is None else 2 * C3)
    return case("causal_self_attention", [qkv], NH, view=view)


def cross_entropy_case(rng, n_ignored, shape=(3, 5), V=7, view=None):
    targets = targets_with_ignored(rng, n_ignored, shape, V)
    return case("cross_entropy", [randn(rng, *shape, V if view is None else 2 * V)], targets, view=view)


def lm_head_cross_entropy_case(rng, n_ignored, shape=(2, 4), V=9, C=5, view=None):
    targets = targets_with_ignored(rng, n_ignored, shape, V)
    x = randn(rng, *shape, C if view is None else 2 * C)
    return case("lm_head_cross_entropy", [x, randn(rng, V, C)], targets, view=view)


def embedding_case(ids, V=5, C=3):
    def lookup(fn):
        return lambda w: fn(ids, w)
    return lambda r: Case(lookup(F.embedding), lookup(ref.embedding), lookup(ref.embedding), [randn(r, V, C)])


def dropout_case(p, shape=(4, 6), seed=7):
    # A fresh generator with the same seed for every call, so every version draws the same mask.
    def seeded(fn):
        return lambda x: fn(x, p, np.random.default_rng(seed))
    return lambda r: Case(seeded(F.dropout), seeded(ref.dropout), seeded(ref.dropout), [randn(r, *shape)])


CASES = {
    "linear": [lambda r: case("linear", [randn(r, 2, 3, 4), randn(r, 4, 5), randn(r, 5)]),
               lambda r: case("linear", [randn(r, 3, 4), randn(r, 4, 2)]),                  # no bias
               lambda r: case("linear", [randn(r, 2, 3, 8), randn(r, 4, 5), randn(r, 5)], view=every_other)],
    "lm_head": [lambda r: case("lm_head", [randn(r, 2, 3, 4), randn(r, 7, 4)]),
                lambda r: case("lm_head", [randn(r, 2, 1, 8), randn(r, 7, 4)], view=every_other)],  # T = 1
    "embedding": [embedding_case(np.array([[0, 4, 2, 0, 0, 1], [3, 4, 4, 2, 1, 0]])),  # repeats, 0 and V-1
                  embedding_case(np.array([[3]]))],
    "dropout": [dropout_case(0.4), dropout_case(0.9), dropout_case(0.0)],
    "gelu": [lambda r: case("gelu", [3 * randn(r, 4, 5)]),
             lambda r: case("gelu", [np.array([[0, 1e-8, -1e-8, 3, -3, 8, -8, 30, -30, 1e3, -1e3]])]),
             lambda r: case("gelu", [randn(r, 3, 8)], view=every_other)],
    "softmax": [lambda r: case("softmax", [randn(r, 2, 3, 5)]),
                lambda r: case("softmax", [awkward_softmax_rows(r)]),
                lambda r: case("softmax", [randn(r, 4, 3)], 0),                                # axis 0
                lambda r: case("softmax", [randn(r, 2, 4, 3)], 1),                             # a middle axis
                lambda r: case("softmax", [randn(r, 3, 4, 10)], view=every_other)],
    "layer_norm": [lambda r: case("layer_norm", [randn(r, 2, 3, 6), randn(r, 6), randn(r, 6)]),
                   lambda r: case("layer_norm", [awkward_layer_norm_rows(r), randn(r, 6), randn(r, 6)]),
                   lambda r: case("layer_norm", [randn(r, 1, 1, 5), randn(r, 5), randn(r, 5)]),      # T = 1
                   lambda r: case("layer_norm", [randn(r, 5, 3), randn(r, 3), randn(r, 3)], 1e-3),   # eps
                   lambda r: case("layer_norm", [randn(r, 2, 4, 6), randn(r, 6), randn(r, 6)],
                                  view=reversed_time)],
    "causal_self_attention": [lambda r: attention_case(r, B=2, T=5, NH=2, hs=2),
                              lambda r: attention_case(r, B=1, T=4, NH=3, hs=2),
                              lambda r: attention_case(r, B=2, T=1, NH=4, hs=1),   # T = 1, hs = 1
                              lambda r: attention_case(r, B=2, T=6, NH=1, hs=2),
                              lambda r: attention_case(r, B=2, T=6, NH=2, hs=2, scale=5.0),   # near one-hot
                              lambda r: attention_case(r, B=2, T=5, NH=2, hs=2, view=every_other)],
    "cross_entropy": [lambda r: cross_entropy_case(r, 0),
                      lambda r: cross_entropy_case(r, 5),
                      lambda r: cross_entropy_case(r, 14),                                  # one target kept
                      awkward_cross_entropy_case,
                      lambda r: cross_entropy_case(r, 5, view=every_other)],
    "lm_head_cross_entropy": [lambda r: lm_head_cross_entropy_case(r, 0),   # the head runs on every row
                              lambda r: lm_head_cross_entropy_case(r, 5),
                              lambda r: lm_head_cross_entropy_case(r, 7),                   # one target kept
                              lambda r: lm_head_cross_entropy_case(r, 1, shape=(3, 1)),     # T = 1
                              lambda r: lm_head_cross_entropy_case(r, 3, view=every_other)],
}

CASE_IDS = [(name, i) for name, cases in CASES.items() for i in range(len(cases))]
DTYPES = [np.float64, np.float32]


def make_case(name, i, dtype):
    """The case's inputs cast to dtype; the same random inputs on every run."""
    c = CASES[name][i](np.random.default_rng(zlib.crc32(f"{name}-{i}".encode())))
    return c, [a.astype(dtype) for a in c.arrays]


def relative_error(got, expected):
    """max |got - expected| / max |expected| over the whole array (0 when both are exactly zero)."""
    scale = np.abs(expected).max()
    if scale == 0:
        return 0.0 if np.array_equal(got, expected) else np.inf
    return float(np.abs(got - expected).max() / scale)


def gradients(fn, arrays, dout):
    """The gradient of sum(fn(inputs) * dout) for each input, by fn's backward."""
    inputs = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    fn(*inputs).backward(dout)
    return [x.grad for x in inputs]


def test_every_fused_op_has_a_checked_twin():
    fused_ops = {name: fn for module in FUSED_MODULES
                 for name, fn in inspect.getmembers(module, inspect.isfunction)
                 if fn.__module__ == module.__name__ and not name.startswith("_") and name not in NO_TWIN}
    missing = set(fused_ops) - set(CASES)
    assert not missing, f"fused ops without a plain twin and a case in CASES: {sorted(missing)}"
    for name, fn in fused_ops.items():
        assert callable(getattr(ref, name, None)), f"minigpt/plain_ops.py has no {name}"
        assert f"Plain twin: minigpt/plain_ops.py:{name}" in fn.__doc__, \
            f"{fn.__module__}.{name}'s docstring does not name its plain twin"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name,i", CASE_IDS, ids=[f"{n}-{i}" for n, i in CASE_IDS])
def test_fused_op_equals_its_plain_twin(name, i, dtype):
    c, arrays = make_case(name, i, dtype)
    got = c.fused(*[Tensor(a) for a in arrays]).data
    expected = c.plain(*arrays)
    assert got.shape == np.shape(expected) and got.dtype == dtype
    assert relative_error(got, expected) <= VALUE_RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name,i", CASE_IDS, ids=[f"{n}-{i}" for n, i in CASE_IDS])
def test_fused_backward_equals_autograd_of_the_basic_op_twin(name, i, dtype):
    c, arrays = make_case(name, i, dtype)
    out_shape = c.basic(*[Tensor(a) for a in arrays]).shape
    dout = np.random.default_rng(1).standard_normal(out_shape).astype(dtype)  # a loss gets dloss != 1
    fused_grads, basic_grads = gradients(c.fused, arrays, dout), gradients(c.basic, arrays, dout)
    for k, (got, expected) in enumerate(zip(fused_grads, basic_grads)):
        assert got is not None and expected is not None
        assert relative_error(got, expected) <= GRAD_RTOL[dtype], f"input {k}"


def test_the_float32_tolerance_tells_gpt2_gelu_from_the_exact_gelu():
    """Test the tester: GELU with erf instead of the tanh approximation must fail the value check."""
    x = np.linspace(-4, 4, 81).astype(np.float32)
    exact_gelu = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()], dtype=np.float32)
    assert relative_error(F.gelu(Tensor(x)).data, exact_gelu) > 100 * VALUE_RTOL[np.float32]  # 1e-4 apart
