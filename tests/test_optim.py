"""Adam and AdamW against their published update rules, worked out by hand; clipping; exact resume."""
import math

import numpy as np
import pytest

from minigpt.nn import Parameter
from minigpt.optim import Adam, AdamW, clip_grad_norm

LR, B1, B2, EPS = 0.1, 0.9, 0.999, 1e-8
GRADS = [np.array([0.5, -1.0]), np.array([0.1, 0.3])]   # the gradients of step 1 and step 2


def run(optimizer_class, **kwargs):
    p = Parameter(np.array([1.0, -2.0]))
    opt = optimizer_class([p], lr=LR, betas=(B1, B2), eps=EPS, **kwargs)
    history = []
    for g in GRADS:
        p.grad = g.copy()
        opt.step()
        history.append(p.data.copy())
    return history


def adam_by_hand(weight_decay=0.0, decoupled=False):
    """The update rule of Kingma & Ba (and Loshchilov & Hutter for AdamW), one coordinate at a time."""
    p, m, v, history = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0], []
    for t, grad in enumerate(GRADS, start=1):
        for i in range(2):
            g = grad[i]
            if decoupled:
                p[i] = p[i] - LR * weight_decay * p[i]
            else:
                g = g + weight_decay * p[i]
            m[i] = B1 * m[i] + (1 - B1) * g
            v[i] = B2 * v[i] + (1 - B2) * g * g
            m_hat, v_hat = m[i] / (1 - B1**t), v[i] / (1 - B2**t)
            p[i] = p[i] - LR * m_hat / (math.sqrt(v_hat) + EPS)
        history.append(list(p))
    return history


def test_adam_first_step_moves_each_weight_by_lr():
    # at t=1, m_hat = g and v_hat = g^2, so the step is lr * sign(g): a well-known property of Adam
    first, _ = run(Adam)
    np.testing.assert_allclose(first, [0.9, -1.9], atol=1e-7)


def test_adam_two_steps_match_the_rule():
    np.testing.assert_allclose(run(Adam), adam_by_hand(), rtol=1e-12)


def test_adam_l2_weight_decay_goes_through_the_gradient():
    np.testing.assert_allclose(run(Adam, weight_decay=0.5), adam_by_hand(0.5, decoupled=False), rtol=1e-12)


def test_adamw_decays_the_weights_directly():
    np.testing.assert_allclose(run(AdamW, weight_decay=0.5), adam_by_hand(0.5, decoupled=True), rtol=1e-12)
    # first step: p = 1 * (1 - 0.1 * 0.5) - 0.1 * sign(g)
    np.testing.assert_allclose(run(AdamW, weight_decay=0.5)[0], [0.95 - 0.1, -1.9 + 0.1], atol=1e-7)


def test_parameters_without_gradient_do_not_move_or_count_steps():
    a, b = Parameter(np.ones(2)), Parameter(np.ones(2))
    opt = AdamW([a, b], lr=0.1)
    a.grad = np.ones(2)
    opt.step()
    assert opt.steps == [1, 0]
    np.testing.assert_array_equal(b.data, np.ones(2))


def test_state_dict_resumes_exactly():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(3) for _ in range(6)]

    def steps(opt, p, gs):
        for g in gs:
            p.grad = g.copy()
            opt.step()

    p1 = Parameter(np.ones(3))
    opt1 = AdamW([p1], lr=0.01, weight_decay=0.1)
    steps(opt1, p1, grads)

    p2 = Parameter(np.ones(3))
    opt2 = AdamW([p2], lr=0.01, weight_decay=0.1)
    steps(opt2, p2, grads[:3])
    saved_state, saved_weights = opt2.state_dict(), p2.data.copy()
    p3 = Parameter(saved_weights)
    opt3 = AdamW([p3], lr=999.0)            # hyperparameters come back from the state too
    opt3.load_state_dict(saved_state)
    steps(opt3, p3, grads[3:])
    np.testing.assert_array_equal(p3.data, p1.data)


def test_zero_grad_clears_and_bad_arguments_fail():
    p = Parameter(np.ones(2))
    p.grad = np.ones(2)
    opt = Adam([p])
    opt.zero_grad()
    assert p.grad is None
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([])
    with pytest.raises(ValueError, match="invalid hyperparameters"):
        AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="has shape"):
        Adam([Parameter(np.ones(3))]).load_state_dict(opt.state_dict())


def test_clip_grad_norm_scales_to_the_global_norm():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(1))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0.0, 0.8], rtol=1e-6)
    # under the limit: untouched
    assert clip_grad_norm([a, b], max_norm=10.0) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(a.grad, [0.6, 0.0], rtol=1e-6)
