"""Adam and AdamW, with PyTorch's arguments and update order, and global gradient-norm clipping.

For each parameter p with gradient g, at step t (counted per parameter, from 1):
    m = beta1 * m + (1 - beta1) * g            # running mean of gradients (momentum)
    v = beta2 * v + (1 - beta2) * g^2          # running mean of squared gradients (scale)
    m_hat = m / (1 - beta1^t)                  # both start at 0: undo that bias early on
    v_hat = v / (1 - beta2^t)
    p = p - lr * m_hat / (sqrt(v_hat) + eps)   # a step of about lr in every coordinate
Weight decay differs: Adam adds it to the gradient (g += wd * p, an L2 penalty that the scaling by
v then distorts); AdamW decays the weights directly (p -= lr * wd * p), "decoupled" (Loshchilov & Hutter).
"""
import math

import numpy as np

from .cpu.parallel import for_slices

# 2 MB of float32 per array and slice: big enough that Python's per-slice cost is small, small enough
# for the slice's four arrays and scratch to stay in cache (measured on gpt2-small: 1 << 16 took
# 300 ms per step, 1 << 19 167 ms, whole arrays more)
SLICE_ELEMENTS = 1 << 19


class Adam:
    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{type(self).__name__}: invalid hyperparameters lr={lr}, betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.steps = [0] * len(self.params)              # per parameter: ones without a grad don't move
        self.exp_avg = [np.zeros_like(p.data) for p in self.params]      # m
        self.exp_avg_sq = [np.zeros_like(p.data) for p in self.params]   # v

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient, in place."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            self.steps[i] += 1
            flat = [a.reshape(-1) for a in (p.data, p.grad, self.exp_avg[i], self.exp_avg_sq[i])]
            # Cache-sized slices on all cores: the update is a dozen passes over four arrays, and the
            # token embedding alone holds 39M numbers.
            for_slices(lambda start, stop: self._update(*(a[start:stop] for a in flat), self.steps[i]),
                       len(flat[0]), max_elements_per_slice=SLICE_ELEMENTS)

    def _update(self, p, g, m, v, t):
        """One Adam(W) step for a slice: p, g, m, v are 1-d views of equal length; t is the step count."""
        beta1, beta2 = self.betas
        if self.weight_decay and self.decoupled_weight_decay:
            p *= 1.0 - self.lr * self.weight_decay       # AdamW: shrink the weights themselves
        elif self.weight_decay:
            g = g + self.weight_decay * p                # Adam: L2 penalty through the gradient
        scratch = np.empty_like(p)
        m *= beta1
        m += np.multiply(g, 1.0 - beta1, out=scratch)    # m = beta1 m + (1 - beta1) g
        v *= beta2
        np.multiply(g, g, out=scratch)
        scratch *= 1.0 - beta2
        v += scratch                                     # v = beta2 v + (1 - beta2) g^2
        np.sqrt(v, out=scratch)
        scratch /= math.sqrt(1.0 - beta2 ** t)           # sqrt(v_hat)
        scratch += self.eps
        np.divide(m, scratch, out=scratch)
        scratch *= self.lr / (1.0 - beta1 ** t)          # lr * m_hat / (sqrt(v_hat) + eps)
        p -= scratch

    def state_dict(self):
        """Everything needed to continue exactly: hyperparameters, per-parameter steps, m and v."""
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "steps": list(self.steps), "exp_avg": [m.copy() for m in self.exp_avg],
                "exp_avg_sq": [v.copy() for v in self.exp_avg_sq]}

    def load_state_dict(self, state):
        if len(state["exp_avg"]) != len(self.params):
            raise ValueError(f"optimizer state holds {len(state['exp_avg'])} parameters, this optimizer has "
                             f"{len(self.params)}")
        for i, p in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                if np.shape(state[key][i]) != p.shape:
                    raise ValueError(f"optimizer state {key}[{i}] has shape {np.shape(state[key][i])}, "
                                     f"the parameter has shape {p.shape}")
        self.lr, self.betas = float(state["lr"]), tuple(float(b) for b in state["betas"])
        self.eps, self.weight_decay = float(state["eps"]), float(state["weight_decay"])
        self.steps = [int(s) for s in state["steps"]]
        self.exp_avg = [np.array(m, dtype=p.dtype) for m, p in zip(state["exp_avg"], self.params)]
        self.exp_avg_sq = [np.array(v, dtype=p.dtype) for v, p in zip(state["exp_avg_sq"], self.params)]


class AdamW(Adam):
    """Adam with decoupled weight decay; PyTorch's default decay of 0.01."""
    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


def clip_grad_norm(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm; return the norm before.

    norm = sqrt(sum over parameters of sum(g^2));  if norm > max_norm: g *= max_norm / (norm + 1e-6)
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = math.sqrt(sum(float(np.vdot(g.ravel(), g.ravel())) for g in grads))  # vdot: BLAS, no g*g temporary
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g *= scale
    return norm
