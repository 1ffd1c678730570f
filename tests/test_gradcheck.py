"""Every differentiable op against central finite differences in float64 (relative error <= 1e-6).

OP_CASES is the registry: op name -> cases, each a function of a Generator returning (fn, inputs).
test_every_op_is_registered_and_documented fails when an op of ops.py, functional.py, losses.py, lora.py or
dpo.py has no case here, or lacks the four docstring sections (Forward, Shapes, Backward, Cache).
"""
import inspect
import zlib

import numpy as np
import pytest

from minigpt import GradcheckError, Tensor, dpo, functional as F, gradcheck, lora, losses, ops


def randn(rng, *shape):
    return rng.standard_normal(shape)


def positive(rng, *shape):
    return 0.5 + np.abs(rng.standard_normal(shape))


def ids_with_repeats(rng, V, shape):
    ids = rng.integers(0, V, size=shape)
    ids.flat[-1] = ids.flat[0]  # make sure at least one id is used twice
    return ids


def random_targets(rng, ignored_fraction, shape, V):
    targets = rng.integers(0, V, size=shape)
    ignore = rng.random(shape) < ignored_fraction
    ignore.flat[0] = False  # keep at least one target
    targets[ignore] = losses.IGNORE_INDEX
    return targets


def cross_entropy_case(rng, ignored_fraction, shape=(3, 5), V=7):
    targets = random_targets(rng, ignored_fraction, shape, V)
    return lambda z: losses.cross_entropy(z, targets), [randn(rng, *shape, V)]


def sequence_logprobs_case(rng, ignored_fraction, reduction, shape=(3, 5), V=9, C=4):
    targets = random_targets(rng, ignored_fraction, shape, V)
    targets[:, -1] = rng.integers(0, V, size=shape[0])  # every sequence keeps at least one target
    return ((lambda x, wte: dpo.sequence_logprobs(x, wte, targets, reduction)),
            [randn(rng, *shape, C), randn(rng, V, C)])


def dpo_loss_case(rng, beta, scale=1.0, B=5):
    ref_chosen, ref_rejected = scale * randn(rng, B), scale * randn(rng, B)  # constants: no gradient
    return ((lambda chosen, rejected: dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)),
            [scale * randn(rng, B), scale * randn(rng, B)])


def lm_head_cross_entropy_case(rng, ignored_fraction, shape=(2, 4), V=9, C=5):
    targets = random_targets(rng, ignored_fraction, shape, V)
    return (lambda x, wte: losses.lm_head_cross_entropy(x, wte, targets)), [randn(rng, *shape, C),
                                                                            randn(rng, V, C)]


def lora_linear_case(rng, x_shape, bias=True, C=4, OC=5, r=3):
    """x, A and B are checked; the frozen W and b are constants, made in x's dtype on each call."""
    weight, b = randn(rng, C, OC), randn(rng, OC) if bias else None

    def fn(x, A, B):
        frozen_b = None if b is None else Tensor(b.astype(x.dtype))
        return lora.lora_linear(x, Tensor(weight.astype(x.dtype)), frozen_b, A, B, scale=1.5)
    return fn, [randn(rng, *x_shape, C), randn(rng, C, r), randn(rng, r, OC)]


OP_CASES = {
    "add": [lambda r: (ops.add, [randn(r, 3, 4), randn(r, 3, 4)]),
            lambda r: (ops.add, [randn(r, 3, 1), randn(r, 4)]),
            lambda r: (ops.add, [randn(r, 2, 3, 4), randn(r, 4)])],
    "sub": [lambda r: (ops.sub, [randn(r, 2, 3), randn(r, 2, 1)]),
            lambda r: (ops.sub, [randn(r, 5), randn(r, 3, 5)])],
    "mul": [lambda r: (ops.mul, [randn(r, 3, 4), randn(r, 3, 4)]),
            lambda r: (ops.mul, [randn(r, 2, 1, 4), randn(r, 3, 1)])],
    "div": [lambda r: (ops.div, [randn(r, 3, 4), positive(r, 3, 4)]),
            lambda r: (ops.div, [randn(r, 2, 4), positive(r, 4)])],
    "neg": [lambda r: (ops.neg, [randn(r, 3, 4)])],
    "power": [lambda r: (lambda x: ops.power(x, 2), [randn(r, 3, 4)]),
              lambda r: (lambda x: ops.power(x, 3), [randn(r, 3, 4)]),
              lambda r: (lambda x: ops.power(x, -0.5), [positive(r, 3, 4)])],
    "exp": [lambda r: (ops.exp, [randn(r, 3, 4)])],
    "log": [lambda r: (ops.log, [positive(r, 3, 4)])],
    "tanh": [lambda r: (ops.tanh, [randn(r, 3, 4)])],
    "matmul": [lambda r: (ops.matmul, [randn(r, 3, 4), randn(r, 4, 5)]),
               lambda r: (ops.matmul, [randn(r, 2, 3, 4, 5), randn(r, 5, 6)]),     # N-d @ 2-d
               lambda r: (ops.matmul, [randn(r, 2, 3, 4), randn(r, 2, 4, 5)]),     # N-d @ N-d
               lambda r: (ops.matmul, [randn(r, 2, 1, 3, 4), randn(r, 3, 4, 2)])],  # broadcast batch
    "sum": [lambda r: (lambda x: ops.sum(x), [randn(r, 3, 4)]),
            lambda r: (lambda x: ops.sum(x, axis=1), [randn(r, 3, 4, 2)]),
            lambda r: (lambda x: ops.sum(x, axis=(0, 2), keepdims=True), [randn(r, 3, 4, 2)])],
    "mean": [lambda r: (lambda x: ops.mean(x), [randn(r, 3, 4)]),
             lambda r: (lambda x: ops.mean(x, axis=-1, keepdims=True), [randn(r, 3, 4)])],
    "reshape": [lambda r: (lambda x: ops.reshape(x, (4, 6)), [randn(r, 2, 3, 4)])],
    "transpose": [lambda r: (lambda x: ops.transpose(x, 0, 2), [randn(r, 2, 3, 4)])],
    "permute": [lambda r: (lambda x: ops.permute(x, (0, 2, 1, 3)), [randn(r, 2, 3, 4, 5)])],
    "getitem": [lambda r: (lambda x: ops.getitem(x, (slice(1, None), slice(None, None, 2))),
                           [randn(r, 4, 5)]),
                lambda r: (lambda x: ops.getitem(x, np.array([0, 2, 0, 3])),
                           [randn(r, 4, 3)]),   # repeated rows
                lambda r: (lambda x: ops.getitem(x, (Ellipsis, -1)), [randn(r, 2, 3, 4)]),
                lambda r: (lambda x: ops.getitem(x, np.array([True, False, True])), [randn(r, 3, 2)])],
    "split": [lambda r: (lambda x: ops.split(x, 3, axis=-1)[1], [randn(r, 2, 6)]),
              lambda r: (lambda x: ops.concat(ops.split(x, [1, 3], axis=0)[::-1], axis=0), [randn(r, 4, 2)])],
    "concat": [lambda r: (lambda a, b: ops.concat([a, b, a], axis=1), [randn(r, 2, 3), randn(r, 2, 1)])],
    "linear": [lambda r: (F.linear, [randn(r, 2, 3, 4), randn(r, 4, 5), randn(r, 5)]),
               lambda r: (F.linear, [randn(r, 3, 4), randn(r, 4, 2)])],
    "lora_linear": [lambda r: lora_linear_case(r, (2, 3)),
                    lambda r: lora_linear_case(r, (2, 3, 2), bias=False),      # N-d x, no bias
                    lambda r: lora_linear_case(r, (7,), C=6, OC=2, r=2)],
    "lm_head": [lambda r: (F.lm_head, [randn(r, 2, 3, 4), randn(r, 7, 4)])],
    "embedding": [lambda r: ((lambda ids: lambda w: F.embedding(ids, w))(ids_with_repeats(r, 5, (2, 6))),
                             [randn(r, 5, 3)])],
    "gelu": [lambda r: (F.gelu, [3 * randn(r, 4, 5)])],
    "softmax": [lambda r: (F.softmax, [randn(r, *r.integers(1, 5, size=3))]),
                lambda r: (lambda x: F.softmax(x, axis=0), [randn(r, 4, 3)])],
    "layer_norm": [lambda r: (F.layer_norm, [randn(r, *r.integers(1, 4, size=2), 6), randn(r, 6),
                                             randn(r, 6)]),
                   lambda r: (lambda x, w, b: F.layer_norm(x, w, b, eps=1e-3), [randn(r, 5, 3), randn(r, 3),
                                                                                randn(r, 3)])],
    "causal_self_attention": [lambda r: (lambda qkv: F.causal_self_attention(qkv, 2), [randn(r, 2, 5, 12)]),
                              lambda r: (lambda qkv: F.causal_self_attention(qkv, 3), [randn(r, 1, 4, 18)])],
    # A fresh generator with a fixed seed on every call: the same mask each time, as differences need.
    "dropout": [lambda r: (lambda x: F.dropout(x, 0.4, np.random.default_rng(7)), [randn(r, 4, 6)])],
    "lm_head_cross_entropy": [lambda r: lm_head_cross_entropy_case(r, 0.0),
                              lambda r: lm_head_cross_entropy_case(r, 0.6)],
    "sequence_logprobs": [lambda r: sequence_logprobs_case(r, 0.0, "mean"),
                          lambda r: sequence_logprobs_case(r, 0.5, "mean"),   # prompt and padding ignored
                          lambda r: sequence_logprobs_case(r, 0.5, "sum")],
    "dpo_loss": [lambda r: dpo_loss_case(r, beta=0.1),
                 lambda r: dpo_loss_case(r, beta=2.0, scale=3.0)],         # |z| up to ~20: saturated pairs
    "cross_entropy": [lambda r: cross_entropy_case(r, 0.0),
                      lambda r: cross_entropy_case(r, 0.3),       # some targets ignored
                      lambda r: cross_entropy_case(r, 0.9)],      # most targets ignored
}

# Public functions of the op modules that are not differentiable ops.
NOT_OPS = {"as_float_tensor", "causal_mask", "split_heads", "softmax_rows_in_place", "kept_targets",
           "target_log_softmax_rows",
           "apply_lora", "check_hyperparameters", "lora_config", "trainable_summary", "merge_lora",
           "unmerge_lora",
           "check_plain", "check_rank_fits", "is_adapter", "layers_of", "lora_layers",
           "reward_metrics", "batch_logprobs", "reference_logprobs", "dpo_batch_loss", "check_beta",
           "check_nll_weight"}
OP_MODULES = (ops, F, losses, lora, dpo)


def differentiable_ops():
    found = set()
    for module in OP_MODULES:
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and not name.startswith("_") and name not in NOT_OPS:
                found.add(name)
    return found


DOCSTRING_SECTIONS = ("Forward:", "Shapes:", "Backward:", "Cache:")


def test_every_op_is_registered_and_documented():
    missing = differentiable_ops() - set(OP_CASES)
    assert not missing, f"ops without a finite-difference case in OP_CASES: {sorted(missing)}"
    for name in differentiable_ops():
        doc = next(getattr(module, name) for module in OP_MODULES if hasattr(module, name)).__doc__ or ""
        absent = [section for section in DOCSTRING_SECTIONS if section not in doc]
        assert not absent, f"{name}'s docstring lacks {', '.join(absent)}"
        positions = [doc.index(section) for section in DOCSTRING_SECTIONS]
        assert positions == sorted(positions), f"{name}'s docstring sections are out of order"


CASES = [(name, i) for name, cases in OP_CASES.items() for i in range(len(cases))]


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_op_gradient_matches_finite_differences(name, case):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{case}".encode()))  # hash() of a str varies per run
    fn, arrays = OP_CASES[name][case](rng)
    inputs = [Tensor(a, requires_grad=True) for a in arrays]
    report = gradcheck(fn, inputs, max_elements=None)
    assert all(err <= 1e-6 for err in report.max_relative_error.values()), report
    assert sum(report.checked.values()) == sum(a.size for a in arrays)


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_op_keeps_float32(name, case):
    """No op promotes float32 to float64: outputs and gradients keep the inputs' dtype."""
    fn, arrays = OP_CASES[name][case](np.random.default_rng(0))
    inputs = [Tensor(a.astype(np.float32), requires_grad=True) for a in arrays]
    out = fn(*inputs)
    assert out.dtype == np.float32
    out.backward(np.ones(out.shape, dtype=np.float32))
    assert all(x.grad.dtype == np.float32 for x in inputs)


def test_gradcheck_catches_a_wrong_backward():
    """Test the tester: sin with a backward off by a factor of 2 must fail, and the message must say where."""
    def wrong_sin(x):
        return Tensor.from_op(np.sin(x.data), (x,), lambda dout: x.accumulate_grad(2 * dout * np.cos(x.data)))

    x = Tensor(np.random.default_rng(0).standard_normal((3, 2)), requires_grad=True)
    with pytest.raises(GradcheckError, match=r"gradient of input 0 at index \(\d+, \d+\) is wrong: analytic"):
        gradcheck(wrong_sin, [x])


def test_gradcheck_catches_a_subtly_wrong_backward():
    """An error of one part in ten thousand is still caught at rtol 1e-6."""
    def almost_exp(x):
        out = np.exp(x.data)
        return Tensor.from_op(out, (x,), lambda dout: x.accumulate_grad(dout * out * (1 + 1e-4)))

    with pytest.raises(GradcheckError):
        gradcheck(almost_exp, [np.random.default_rng(1).standard_normal(4)])


def test_gradcheck_passes_a_correct_custom_function_and_reports_errors():
    report = gradcheck(lambda x, y: (x * y).tanh().sum(axis=0), [np.ones((2, 3)), np.full((2, 3), 0.5)])
    assert set(report.max_relative_error) == {"input 0", "input 1"}
    assert max(report.max_relative_error.values()) < 1e-6


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(ops.exp, [Tensor(np.ones(3, dtype=np.float32), requires_grad=True)])


def test_diamond_graph_and_composed_mlp():
    """x feeds two paths that meet again; and a small MLP trained by cross-entropy, end to end."""
    rng = np.random.default_rng(3)
    gradcheck(lambda x: ops.mul(ops.tanh(x), ops.exp(x)) + x, [randn(rng, 4, 3)])

    targets = np.array([[1, 0, losses.IGNORE_INDEX], [2, 2, 1]])

    def mlp(x, w1, b1, w2, b2):
        hidden = F.gelu(F.linear(x, w1, b1))          # (2, 3, 4) -> (2, 3, 8)
        return losses.cross_entropy(F.linear(hidden, w2, b2), targets)

    report = gradcheck(mlp, [randn(rng, 2, 3, 4), randn(rng, 4, 8), randn(rng, 8), randn(rng, 8, 3),
                             randn(rng, 3)], max_elements=None)
    assert max(report.max_relative_error.values()) <= 1e-6
