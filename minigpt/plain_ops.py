"""Every fused op of minigpt written plainly: read these formulas first, then the fast code.

functional.py, losses.py, lora.py and dpo.py compute each op in in-place passes over row slices, with a
hand-written backward: fast, and the formula is hard to see. Here every op is its formula in a few
lines, twice:

- `gelu`, `softmax`, `layer_norm`, `causal_self_attention`, `cross_entropy`, ...: the forward in
  plain NumPy, arrays in and an array out;
- `gelu_from_basic_ops`, ...: the same formula through minigpt's basic ops (minigpt.ops: add, mul,
  exp, log, tanh, sum, mean, matmul, getitem, concat), so autograd of those simple ops gives the
  gradient that the fused backward must reproduce. `linear`, `lm_head`, `embedding` and `dropout`
  use only Python's operators, which a Tensor maps to the basic ops, so one function serves as both.

Each fused op's docstring names its twin here. The tests check that each fused op equals its twin, in
value and in gradient (tests/test_reference_ops.py; LoRA's and DPO's in tests/test_lora.py and
tests/test_dpo.py). The constants (0.044715, eps = 1e-5, 1/sqrt(hs)) are written out again rather than
imported, so a wrong constant in functional.py shows up as a difference.
Letters: B batch, T time, C channels, V vocabulary, NH heads, hs = C / NH, OC output channels, r LoRA's rank.
"""
import math

import numpy as np

from . import ops
from .losses import IGNORE_INDEX


# ----- ops that are one line of operators: the same function for arrays and for Tensors -----------------
def linear(x, w, b=None):
    """out = x @ w + b;   x (..., C), w (C, OC), b (OC,) -> out (..., OC)"""
    return x @ w if b is None else x @ w + b


def lm_head(x, wte):
    """logits = x @ wte^T, the output head tied to the token embedding;  x (..., C), wte (V, C) -> (..., V)"""
    return x @ wte.T


def embedding(ids, w):
    """out[b, t] = w[ids[b, t]];   ids (B, T) integers, w (V, C) -> out (B, T, C)"""
    return w[ids]


def dropout(x, p, rng):
    """Training-mode dropout: keep each element with probability 1 - p and divide the kept ones by 1 - p.

    The uniform numbers are drawn as functional.dropout draws them (x's shape and dtype), so a
    generator in the same state gives the same mask.
    """
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    return x * (keep.astype(x.dtype) / (1 - p))


# ----- plain NumPy forwards ------------------------------------------------------------------------------
def gelu(x):
    """GPT-2's GELU, the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x, axis=-1):
    """exp(x_i) / sum_j exp(x_j) along axis.

    The largest x is subtracted first: softmax does not change when a constant is added to every x,
    and exp of a large logit would overflow.
    """
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z):
    """log softmax(z) along the last axis: z_i - log sum_j exp(z_j), shifted by the largest z as above."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def layer_norm(x, w, b, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis (var divides by C, not C - 1)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def causal_self_attention(qkv, n_heads):
    """Each position attends to itself and the positions before it, in each head separately.

    q, k, v are the three C-wide thirds of qkv (B, T, 3C); head h owns columns h*hs .. (h+1)*hs of each.
    out[:, :, head h] = softmax(q_h k_h^T / sqrt(hs), with future keys set to -inf) @ v_h    (B, T, C)
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_heads
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]            # (B, T, C) each
    future = np.triu(np.ones((T, T), dtype=bool), k=1)                     # (T, T): key after query
    out = np.empty((B, T, C), dtype=qkv.dtype)
    for h in range(n_heads):
        head = slice(h * hs, (h + 1) * hs)
        scores = q[..., head] @ np.swapaxes(k[..., head], 1, 2) / math.sqrt(hs)   # (B, T, T)
        scores[:, future] = -np.inf
        out[..., head] = softmax(scores) @ v[..., head]                    # (B, T, hs)
    return out


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX):
    """Mean over the kept rows of -log softmax(z)[target]; rows whose target is ignore_index are dropped."""
    z = logits.reshape(-1, logits.shape[-1])                               # (N, V)
    t = targets.reshape(-1)                                                # (N,)
    kept = t != ignore_index
    log_probs = log_softmax(z[kept])                                       # (N_valid, V)
    return -log_probs[np.arange(kept.sum()), t[kept]].mean()


def lm_head_cross_entropy(x, wte, targets, ignore_index=IGNORE_INDEX):
    """cross_entropy(lm_head(x, wte), targets): the head runs on every row; ignored rows are dropped after."""
    return cross_entropy(lm_head(x, wte), targets, ignore_index)


def lora_linear(x, w, b, A, B, scale):
    """LoRA's layer: the frozen x @ w + b plus the low-rank update scale * (x @ A) @ B.

    x (..., C), w (C, OC), b (OC,), A (C, r), B (r, OC) -> (..., OC). The same as one linear layer of weight
    w + scale * A @ B. Operators only, so it serves Tensors too (w and b frozen: they get no gradient).
    """
    return linear(x, w, b) + scale * ((x @ A) @ B)


def sequence_logprobs(x, wte, targets, reduction="mean", ignore_index=IGNORE_INDEX):
    """DPO's log-probability of each sequence: sum (or mean) over its kept positions t of
    log softmax(x_t @ wte^T)[target_t];  x (B, T, C), wte (V, C), targets (B, T) -> (B,)."""
    log_probs = log_softmax(lm_head(x, wte))                               # (B, T, V)
    kept = targets != ignore_index                                         # (B, T)
    b, t = np.nonzero(kept)
    per_token = np.zeros(targets.shape, dtype=x.dtype)                     # (B, T)
    per_token[b, t] = log_probs[b, t, targets[b, t]]
    total = per_token.sum(axis=1)                                          # (B,)
    return total / kept.sum(axis=1) if reduction == "mean" else total


# ----- the same formulas through minigpt's basic ops (Tensors in, a Tensor out) -------------------------
def gelu_from_basic_ops(x):
    return 0.5 * x * (1 + ops.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax_from_basic_ops(x, axis=-1):
    # The shift is a constant (plain data, no gradient): softmax's value and gradient do not depend on it.
    e = ops.exp(x - x.data.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_from_basic_ops(z):
    shifted = z - z.data.max(axis=-1, keepdims=True)
    return shifted - ops.log(ops.exp(shifted).sum(axis=-1, keepdims=True))


def layer_norm_from_basic_ops(x, w, b, eps=1e-5):
    centered = x - x.mean(axis=-1, keepdims=True)
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return centered * (var + eps) ** -0.5 * w + b


def causal_self_attention_from_basic_ops(qkv, n_heads):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_heads
    hide_future = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, 0.0).astype(qkv.dtype)
    heads = []
    for h in range(n_heads):
        q, k, v = (qkv[..., third * C + h * hs:third * C + (h + 1) * hs] for third in range(3))
        scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(hs)) + hide_future   # (B, T, T)
        heads.append(softmax_from_basic_ops(scores) @ v)                    # (B, T, hs)
    return ops.concat(heads, axis=-1)                                       # (B, T, C)


def cross_entropy_from_basic_ops(logits, targets, ignore_index=IGNORE_INDEX):
    t = np.asarray(targets).reshape(-1)                                     # (N,)
    kept = np.flatnonzero(t != ignore_index)
    z = logits.reshape(-1, logits.shape[-1])[kept]                          # (N_valid, V)
    return -log_softmax_from_basic_ops(z)[np.arange(len(kept)), t[kept]].mean()


def lm_head_cross_entropy_from_basic_ops(x, wte, targets, ignore_index=IGNORE_INDEX):
    return cross_entropy_from_basic_ops(lm_head(x, wte), targets, ignore_index)


def sequence_logprobs_from_basic_ops(x, wte, targets, reduction="mean", ignore_index=IGNORE_INDEX):
    # Selecting the kept targets is a product with a constant 0/1 array (divided by the count for "mean").
    log_probs = log_softmax_from_basic_ops(lm_head(x, wte))               # (B, T, V)
    kept = targets != ignore_index                                         # (B, T)
    select = np.zeros(log_probs.shape, dtype=x.dtype)
    b, t = np.nonzero(kept)
    select[b, t, targets[b, t]] = 1.0
    if reduction == "mean":
        select /= kept.sum(axis=1)[:, None, None]
    return (log_probs * select).sum(axis=(1, 2))                          # (B,)
