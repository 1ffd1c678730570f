"""Neural-network ops of GPT-2, each a fused forward/backward pair (after llm.c's *_forward/_backward).
The loss (cross-entropy, fused with the output head) is in losses.py.

Letters used in every shape below:
    B  batch size              T  sequence length          C  channels (emb_dim)
    V  vocabulary size         NH number of heads          hs head size, C / NH
    OC output channels of a linear layer                   N  rows (B*T)

Fusing an op (softmax, layer_norm, GELU, attention) into one forward and one
hand-written backward is what makes a NumPy GPT fast: the graph holds a dozen nodes per block, not
a hundred, and the backward reuses what the forward cached. Each backward is checked against
central finite differences in tests/test_gradcheck.py.
"""
import functools
import math

import numpy as np

from .ops import as_float_tensor
from .cpu.parallel import in_row_slices, matmul, matmul_tn, parallel_map, sequence_blocks
from .tensor import Tensor


# Python floats, not NumPy float64 scalars: under NumPy 2's promotion rules a float64 scalar would
# silently turn a float32 array into float64.
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_COEFF = 0.044715


def linear(x, weight, bias=None):
    """Affine map, the workhorse of GPT-2 (c_attn, c_proj, c_fc).

    Forward:  out = x @ W + b
    Shapes:   x (..., C), W (C, OC), b (OC,) -> out (..., OC)
    Backward: dx = dout @ W^T;  dW = x^T @ dout (summed over every leading axis);  db = sum(dout)
    Cache:    x, W
    Plain twin: minigpt/plain_ops.py:linear

    The leading axes are folded into rows, so each product is one BLAS matrix multiply.
    """
    x = as_float_tensor("linear", x)
    C, OC = weight.shape
    if x.shape[-1] != C:
        raise ValueError(f"linear: input has {x.shape[-1]} features (shape {x.shape}), weight expects {C} "
                         f"(shape {weight.shape})")
    x2d = x.data.reshape(-1, C)                                   # (N, C)
    out = matmul(x2d, weight.data, None if bias is None else bias.data)  # (N, OC)

    def backward(dout):
        dout2d = dout.reshape(-1, OC)                             # (N, OC)
        if x.requires_grad:
            x.accumulate_grad(matmul(dout2d, weight.data.T).reshape(x.shape))
        if weight.requires_grad:
            weight.accumulate_grad(matmul_tn(x2d, dout2d), owned=True)  # (C, OC)
        if bias is not None and bias.requires_grad:
            ones = np.ones(len(dout2d), dout2d.dtype)             # sum over rows as a BLAS product: 3x faster
            bias.accumulate_grad(ones @ dout2d, owned=True)       # (OC,)
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor.from_op(out.reshape(*x.shape[:-1], OC), parents, backward)


def lm_head(x, wte):
    """GPT-2's output head, tied to the token embedding: one logit per vocabulary entry.

    Forward:  logits = x @ wte^T
    Shapes:   x (..., C), wte (V, C) -> logits (..., V)
    Backward: dx = dlogits @ wte;  dwte = dlogits^T @ x   (added to the embedding's own gradient)
    Cache:    x, wte
    Plain twin: minigpt/plain_ops.py:lm_head
    """
    V, C = wte.shape
    x2d = x.data.reshape(-1, C)                                   # (N, C)
    logits = matmul(x2d, wte.data.T)                              # (N, V)

    def backward(dlogits):
        dlogits2d = dlogits.reshape(-1, V)                        # (N, V)
        if x.requires_grad:
            x.accumulate_grad(matmul(dlogits2d, wte.data).reshape(x.shape))
        if wte.requires_grad:
            wte.accumulate_grad(matmul_tn(dlogits2d, x2d), owned=True)  # (V, C)
    return Tensor.from_op(logits.reshape(*x.shape[:-1], V), (x, wte), backward)


def embedding(ids, weight):
    """Look up one row of `weight` per integer id (token or position embeddings).

    Forward:  out[b, t] = W[ids[b, t]]
    Shapes:   ids (B, T) integers in [0, V), W (V, C) -> out (B, T, C)
    Backward: dW[v] = sum of dout[b, t] over every (b, t) with ids[b, t] == v  (scatter-add:
              a repeated id collects the gradient of each of its uses)
    Cache:    ids
    Plain twin: minigpt/plain_ops.py:embedding
    The sum per distinct id is formed first, then added into only those rows of dW: the positions
    are sorted by id, so each id's rows are adjacent and one np.add.reduceat sums them (np.add.at,
    the obvious scatter-add, is 5x slower).
    """
    ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    V = weight.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        bad = ids[(ids < 0) | (ids >= V)].flat[0]
        raise ValueError(f"embedding: id {bad} is outside the table's range [0, {V})")

    def backward(dout):
        if ids.size == 0:
            return
        flat_ids = ids.reshape(-1)                                        # (B*T,)
        order = np.argsort(flat_ids, kind="stable")                       # positions grouped by id
        sorted_ids = flat_ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # (n,) first of each id
        drows = np.add.reduceat(dout.reshape(-1, weight.shape[1])[order], starts, axis=0)  # (n, C)
        weight.accumulate_grad_rows(sorted_ids[starts], drows)
    return Tensor.from_op(weight.data[ids], (weight,), backward)


def gelu(x):
    """GELU, tanh approximation, as GPT-2 ("gelu_new").

    Forward:  out = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
    Shapes:   x (any) -> out (same)
    Backward: dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx),   t = tanh(u),
              du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    Cache:    x, t
    Plain twin: minigpt/plain_ops.py:gelu

    Written as in-place passes over row slices: no full-size temporaries, and every core busy.
    """
    x = as_float_tensor("gelu", x)
    t, out = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)

    def forward(xs, ts, outs):
        np.multiply(xs, xs, out=ts)                               # x^2
        ts *= GELU_COEFF
        ts += 1.0
        ts *= xs
        ts *= SQRT_2_OVER_PI                                      # u
        np.tanh(ts, out=ts)                                       # t
        np.add(ts, 1.0, out=outs)
        outs *= xs
        outs *= 0.5
    in_row_slices(forward, x.data, t, out)

    def backward(dout):
        dx = np.empty(x.shape, x.dtype)

        def backward_slice(xs, ts, douts, dxs):
            np.multiply(xs, xs, out=dxs)
            dxs *= 3 * GELU_COEFF
            dxs += 1.0
            dxs *= 0.5 * SQRT_2_OVER_PI
            dxs *= xs                                             # 0.5 x du/dx
            scratch = ts * ts
            np.subtract(1.0, scratch, out=scratch)
            dxs *= scratch                                        # ... * (1 - t^2)
            np.multiply(ts, 0.5, out=scratch)
            dxs += scratch
            dxs += 0.5                                            # + 0.5 (1 + t)
            dxs *= douts
        in_row_slices(backward_slice, x.data, t, dout, dx)
        x.accumulate_grad(dx)
    return Tensor.from_op(out, (x,), backward)


def _softmax_in_place(z):
    """Overwrite z (C-contiguous) with softmax(z) along the last axis, in row slices on all cores."""
    in_row_slices(softmax_rows_in_place, z)
    return z


def softmax(x, axis=-1):
    """Numerically stable softmax.

    Forward:  out = exp(x - max(x)) / sum(exp(x - max(x)))          along axis
    Shapes:   x (..., V) -> out (..., V)
    Backward: dx = out * (dout - sum(dout * out))                   (sum along axis, kept)
    Cache:    out
    Plain twin: minigpt/plain_ops.py:softmax
    """
    x = as_float_tensor("softmax", x)
    on_last_axis = np.moveaxis(x.data, axis, -1).copy()          # our own C-ordered array to overwrite
    out = np.moveaxis(_softmax_in_place(on_last_axis), -1, axis)

    def backward(dout):
        dx = dout * out
        dx -= out * dx.sum(axis=axis, keepdims=True)
        x.accumulate_grad(dx)
    return Tensor.from_op(out, (x,), backward)


def layer_norm(x, weight, bias, eps=1e-5):
    """Layer normalization over the channels, with a learned scale and shift.

    Forward:  xhat = (x - mean_C(x)) * rstd,  rstd = (var_C(x) + eps)^-1/2;   out = w * xhat + b
    Shapes:   x (B, T, C), w (C,), b (C,) -> out (B, T, C)
    Backward: db = sum_BT(dout);  dw = sum_BT(dout * xhat)
              g = dout * w;  dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))
    Cache:    xhat (B, T, C), rstd (B, T, 1)
    Plain twin: minigpt/plain_ops.py:layer_norm
    (derivation: llm.c doc/layernorm; the three terms are the direct path, the mean, the variance)
    """
    x = as_float_tensor("layer_norm", x)
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"layer_norm: input has {C} channels (shape {x.shape}) but weight/bias have shapes "
                         f"{weight.shape} and {bias.shape}")
    xhat, out = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)     # (B, T, C)
    rstd = np.empty((*x.shape[:-1], 1), x.dtype)                            # (B, T, 1)
    # Sums over C as matrix-vector products: BLAS sums a row of 128 numbers 4x faster than x.sum(axis=1).
    # (Weights of exactly 1, then a division by C: weights of 1/C would round, and with the mean far from 0
    # that rounding would show in xhat.)
    ones = np.ones(C, x.dtype)                                              # (C,)

    def forward(xs, xhats, rstds, outs):
        np.subtract(xs, (xs @ ones / C)[:, None], out=xhats)                # x - mean
        np.multiply(xhats, xhats, out=outs)                                 # outs: scratch for the squares
        np.matmul(outs, ones, out=rstds[:, 0])
        rstds /= C                                                          # variance
        rstds += eps
        np.sqrt(rstds, out=rstds)
        np.divide(1.0, rstds, out=rstds)                                    # rstd
        xhats *= rstds
        np.multiply(xhats, weight.data, out=outs)
        outs += bias.data
    in_row_slices(forward, x.data, xhat, rstd, out)

    def backward(dout):
        dx = np.empty(x.shape, x.dtype)

        def backward_slice(douts, xhats, rstds, dxs):
            ones = np.ones(len(douts), douts.dtype)                         # (n,): sums over rows
            dout_xhat = douts * xhats                                       # (n, C)
            db, dw = ones @ douts, ones @ dout_xhat                         # this slice's part of db, dw
            mean_g = douts @ weight.data / C                                # mean_C(g), g = dout * w
            mean_g_xhat = dout_xhat @ weight.data / C                       # mean_C(g * xhat)
            np.multiply(xhats, mean_g_xhat[:, None], out=dxs)
            g = np.multiply(douts, weight.data, out=dout_xhat)              # reuses dout_xhat's memory
            np.subtract(g, dxs, out=dxs)
            dxs -= mean_g[:, None]
            dxs *= rstds
            return db, dw
        partial_sums = in_row_slices(backward_slice, dout, xhat, rstd, dx)
        if bias.requires_grad:
            bias.accumulate_grad(np.sum([db for db, _ in partial_sums], axis=0), owned=True)
        if weight.requires_grad:
            weight.accumulate_grad(np.sum([dw for _, dw in partial_sums], axis=0), owned=True)
        if x.requires_grad:
            x.accumulate_grad(dx, owned=True)
    return Tensor.from_op(out, (x, weight, bias), backward)


@functools.lru_cache(maxsize=16)
def causal_mask(n_queries, n_keys, dtype):
    """(n_queries, n_keys) additive mask: 0 where query i may see key j, -inf where j is in its future.

    The queries are the last n_queries positions, so query i sits at position n_keys - n_queries + i.
    """
    mask = np.triu(np.ones((n_queries, n_keys), dtype=bool), k=n_keys - n_queries + 1)
    return np.where(mask, -np.inf, 0.0).astype(dtype)


def split_heads(qkv, n_heads):
    """(B, T, 3C) -> q, k, v views of shape (B, NH, T, hs); no copy (BLAS takes the strides)."""
    B, T, C3 = qkv.shape
    heads = qkv.reshape(B, T, 3, n_heads, C3 // (3 * n_heads))    # (B, T, 3, NH, hs)
    return [heads[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def causal_self_attention(qkv, n_heads):
    """Multi-head causal self-attention, all heads at once (no Python loop over heads).

    Forward:  q, k, v = split(qkv) into NH heads
              S = q @ k^T * scale + mask,  scale = 1/sqrt(hs),
                  mask = -inf where the key is in the query's future
              att = softmax(S);  y = att @ v;  out = y with the heads joined back into C
    Shapes:   qkv (B, T, 3C) -> q, k, v (B, NH, T, hs) -> S, att (B, NH, T, T) -> out (B, T, C)
    Backward: datt = dy @ v^T;  dv = att^T @ dy
              dS = att * (datt - sum_keys(datt * att)) * scale    (softmax backward; the scale is applied
                                                                   here, once, as in the forward's S)
              dq = dS @ k;  dk = dS^T @ q;  dqkv = join(dq, dk, dv)
    Cache:    qkv (q, k, v are views of it), att
    Plain twin: minigpt/plain_ops.py:causal_self_attention
    Masked entries have att = 0, so their gradient is exactly zero with no extra masking pass.
    Sequences are independent, so each thread takes a block of them (or of one sequence's heads) through
    every step in turn, while its scores are still in cache.
    """
    qkv = as_float_tensor("causal_self_attention", qkv)
    B, T, C3 = qkv.shape
    if C3 % (3 * n_heads):
        raise ValueError(f"causal_self_attention: last axis {C3} is not 3 * C with C divisible by "
                         f"{n_heads} heads")
    C, hs = C3 // 3, C3 // (3 * n_heads)
    scale = 1.0 / math.sqrt(hs)
    mask = causal_mask(T, T, qkv.dtype)                          # (T, T)
    q, k, v = split_heads(qkv.data, n_heads)                     # (B, NH, T, hs) views of qkv
    att = np.empty((B, n_heads, T, T), qkv.dtype)                 # (B, NH, T, T)
    out = np.empty((B, T, C), qkv.dtype)                          # (B, T, C)
    y = out.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)      # (B, NH, T, hs) view of out
    blocks = sequence_blocks(B, n_heads, 2 * T * T * hs)          # two T x T x hs products per head

    def forward(block):
        np.matmul(q[block], k[block].transpose(0, 1, 3, 2), out=att[block])     # S
        att[block] *= scale
        att[block] += mask
        softmax_rows_in_place(att[block])                        # att
        np.matmul(att[block], v[block], out=y[block])
    parallel_map(forward, blocks)

    def backward(dout):
        dqkv = np.empty((B, T, 3, n_heads, hs), dtype=qkv.dtype)  # (B, T, 3, NH, hs)
        dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, NH, T, hs) views
        dy = dout.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)

        def backward_block(block):
            att_b = att[block]
            datt = dy[block] @ v[block].transpose(0, 1, 3, 2)     # (b, nh, T, T)
            np.matmul(att_b.transpose(0, 1, 3, 2), dy[block], out=dv[block])
            datt -= np.einsum("bhqk,bhqk->bhq", datt, att_b)[..., None]  # sum over keys, without a temporary
            dS = np.multiply(datt, att_b, out=datt)               # datt's memory holds dS from here on
            dS *= scale
            np.matmul(dS, k[block], out=dq[block])
            np.matmul(dS.transpose(0, 1, 3, 2), q[block], out=dk[block])
        parallel_map(backward_block, blocks)
        qkv.accumulate_grad(dqkv.reshape(B, T, C3), owned=True)
    return Tensor.from_op(out, (qkv,), backward)


def softmax_rows_in_place(z):
    """Overwrite z (any shape, any strides) with softmax along its last axis."""
    z -= z.max(axis=-1, keepdims=True)                            # the largest becomes 0: exp cannot overflow
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)


def dropout(x, p, rng, training=True):
    """Inverted dropout: zero each element with probability p, scale the survivors by 1/(1-p).

    Forward:  out = x * mask,   mask = (u >= p) / (1 - p),  u ~ Uniform[0, 1) drawn from `rng`
    Shapes:   x (any) -> out (same)
    Backward: dx = dout * mask
    Cache:    mask
    Plain twin: minigpt/plain_ops.py:dropout
    The scaling keeps E[out] = x, so evaluation (training=False or p=0) is the identity.
    """
    x = as_float_tensor("dropout", x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    mask = rng.random(x.shape, dtype=x.dtype) >= p
    mask = mask.astype(x.dtype)
    mask *= 1.0 / (1.0 - p)
    return Tensor.from_op(x.data * mask, (x,), lambda dout: x.accumulate_grad(dout * mask))
