"""Autograd semantics: accumulation, graph release, no_grad, deep graphs, broadcasting, clear errors."""
import numpy as np
import pytest

import minigpt
from minigpt import Tensor, functional as F, losses, no_grad, ops
from minigpt.tensor import unbroadcast


def leaf(*values):
    return Tensor(np.array(values, dtype=np.float64), requires_grad=True)


def test_diamond_graph_sums_both_paths():
    # y = x^2 feeds two branches that meet: z = y*3 + y*y  ->  dz/dx = (3 + 2y) * 2x
    x = leaf(1.5, -2.0)
    y = x * x
    z = (y * 3.0 + y * y).sum()
    z.backward()
    np.testing.assert_allclose(x.grad, (3 + 2 * x.data**2) * 2 * x.data)


def test_same_tensor_on_both_sides_of_an_op():
    x = leaf(3.0)
    (x * x).backward()          # d(x^2)/dx = 2x
    np.testing.assert_allclose(x.grad, [6.0])
    y = leaf(2.0)
    (y + y).backward()
    np.testing.assert_allclose(y.grad, [2.0])


def test_gradients_accumulate_across_backward_calls_until_zeroed():
    x = leaf(1.0, 2.0)
    (x * 2.0).sum().backward()
    (x * 5.0).sum().backward()
    np.testing.assert_allclose(x.grad, [7.0, 7.0])
    x.grad = None
    (x * 5.0).sum().backward()
    np.testing.assert_allclose(x.grad, [5.0, 5.0])


def test_shared_dout_is_not_aliased_between_inputs():
    """a + b hands the same dout to both; adding more into a.grad must not change b.grad."""
    a, b = leaf(1.0), leaf(2.0)
    s = a + b
    (s * 1.0 + a * 10.0).sum().backward()
    np.testing.assert_allclose(a.grad, [11.0])
    np.testing.assert_allclose(b.grad, [1.0])
    a.grad *= 0  # an optimizer modifying one leaf's gradient in place leaves the other alone
    np.testing.assert_allclose(b.grad, [1.0])


def test_backward_releases_the_graph_unless_retained():
    x = leaf(1.0, 2.0)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * (2 * x.data))
    with pytest.raises(RuntimeError, match="released"):
        y.backward()


def test_backward_needs_a_gradient_for_non_scalars():
    x = leaf(1.0, 2.0)
    with pytest.raises(RuntimeError, match="single-number output"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\)"):
        (x * 2.0).backward(np.ones(3))
    (x * 2.0).backward(np.array([1.0, 10.0]))
    np.testing.assert_allclose(x.grad, [2.0, 20.0])


def test_no_grad_records_nothing():
    x = leaf(1.0, 2.0)
    with no_grad():
        assert not minigpt.is_grad_enabled()
        y = F.gelu(x * 3.0)
    assert minigpt.is_grad_enabled()
    assert not y.requires_grad and y._parents == () and y._backward_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_a_very_deep_graph_needs_no_recursion():
    x = leaf(0.5)
    y = x
    for _ in range(20_000):     # far deeper than Python's recursion limit; GPT-2 XL has ~1,000 nodes
        y = y * 1.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0])


def test_unbroadcast_reduces_to_the_input_shape():
    grad = np.ones((2, 3, 4))
    assert unbroadcast(grad, (4,)).tolist() == [6.0] * 4
    assert unbroadcast(grad, (3, 1)).tolist() == [[8.0]] * 3
    assert unbroadcast(grad, (2, 3, 4)) is grad


def test_python_numbers_take_the_tensor_dtype_and_arrays_must_match():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    assert (x * 0.5 + 1).dtype == np.float32
    assert (2.0 / x).dtype == np.float32
    assert Tensor([1.0, 2.0]).dtype == np.float32  # Python floats default to float32
    with pytest.raises(TypeError, match="dtypes differ"):
        x + np.ones(3, dtype=np.float64)


def test_ops_on_a_float64_scalar_stay_float64():
    """A loss is 0-d, and NumPy returns 0-d results as scalars: no op may round them to float32."""
    loss = Tensor(np.array(1 + 1e-12), requires_grad=True)
    for out in (-loss, loss * 2.0, loss + loss, loss / 3.0, loss ** 2, loss.exp(), loss.log(), loss.tanh()):
        assert out.dtype == np.float64
    (-loss).backward()
    assert loss.grad.dtype == np.float64 and loss.grad == -1.0


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"shapes \(3, 4\) and \(5,\) cannot be broadcast"):
        ops.add(np.ones((3, 4)), np.ones(5))
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(4, 5\) do not align"):
        ops.matmul(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(TypeError, match="exp needs a floating-point tensor, got dtype int64"):
        ops.exp(np.arange(3))
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(ValueError, match=r"cannot reshape \(2, 3\)"):
        ops.reshape(np.ones((2, 3)), (4, 2))
    with pytest.raises(ValueError, match="linear: input has 3 features"):
        F.linear(np.ones((2, 3)), Tensor(np.ones((4, 5))))


def test_cross_entropy_ignored_targets_and_bad_targets():
    rng = np.random.default_rng(0)
    logits = Tensor(rng.standard_normal((2, 3, 5)), requires_grad=True)
    targets = np.array([[1, -100, 4], [-100, -100, 0]])
    loss = losses.cross_entropy(logits, targets)
    # the mean over the three valid targets, written out
    z = logits.data.reshape(-1, 5)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss.item(), -(log_probs[0, 1] + log_probs[2, 4] + log_probs[5, 0]) / 3)
    loss.backward()
    assert np.all(logits.grad[targets == -100] == 0.0)          # exactly zero, not merely small
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        losses.cross_entropy(logits, np.full((2, 3), -100))
    with pytest.raises(ValueError, match=r"target 5 is outside \[0, 5\)"):
        losses.cross_entropy(logits, np.array([[1, 5, 0], [0, 0, 0]]))
    with pytest.raises(TypeError, match="targets must be integer class ids, got dtype float64"):
        losses.cross_entropy(logits, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) do not match logits of shape \(2, 3, 5\)"):
        losses.cross_entropy(logits, np.zeros(3, dtype=int))
    custom = losses.cross_entropy(logits, np.where(targets == -100, 7, targets), ignore_index=7)
    np.testing.assert_allclose(custom.item(), loss.item())


def test_dropout_train_and_eval():
    x = Tensor(np.ones((1000,), dtype=np.float32), requires_grad=True)
    out = F.dropout(x, 0.25, np.random.default_rng(0))
    kept = out.data != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(out.data[kept], 1 / 0.75, rtol=1e-6)   # inverted scaling
    assert F.dropout(x, 0.25, np.random.default_rng(0), training=False) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        F.dropout(x, 1.0, np.random.default_rng(0))


def test_embedding_repeated_ids_accumulate_and_bad_ids_fail():
    weight = Tensor(np.zeros((4, 2)), requires_grad=True)
    F.embedding(np.array([[1, 1, 3]]), weight).sum().backward()
    np.testing.assert_allclose(weight.grad, [[0, 0], [2, 2], [0, 0], [1, 1]])
    with pytest.raises(ValueError, match=r"id 4 is outside the table's range \[0, 4\)"):
        F.embedding(np.array([0, 4]), weight)
    with pytest.raises(TypeError, match="ids must be integers"):
        F.embedding(np.array([0.0]), weight)
