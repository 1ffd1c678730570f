"""The loss: mean cross-entropy of integer targets, fused with log-softmax, with an ignore index.

Letters as in functional.py: N rows (the targets that count), V vocabulary size, C channels.

Targets equal to IGNORE_INDEX are skipped: padding after the first <|endoftext|> and, with prompt
masking, the prompt (see minigpt.data.collate). The mean runs over the targets that count, and an
ignored position gets exactly zero gradient. `lm_head_cross_entropy` fuses GPT-2's tied output head
into the loss, so the (N, V) logits, a step's largest array, are made only for the rows that count.
Each backward is checked against central finite differences in tests/test_gradcheck.py.
"""
import numpy as np

from .ops import as_float_tensor
from .cpu.parallel import for_slices, matmul, matmul_tn
from .tensor import Tensor, is_grad_enabled

# Targets equal to this are skipped by the loss: padding after the first <|endoftext|> and, with
# prompt masking, the prompt. Shared with minigpt.data so the two can never disagree.
IGNORE_INDEX = -100


def kept_targets(op, targets, leading_shape, V, ignore_index):
    """(mask of the flat targets that count (B*T,), their ids (N,)); a clear error names the op otherwise."""
    targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"{op}: targets must be integer class ids, got dtype {targets.dtype}")
    if targets.shape != leading_shape:
        raise ValueError(f"{op}: targets of shape {targets.shape} do not match logits of shape "
                         f"{(*leading_shape, V)} (expected targets {leading_shape})")
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    if not valid.any():
        raise ValueError(f"{op}: every target equals ignore_index ({ignore_index}), so there is no loss "
                         f"to average; the batch holds no tokens to learn")
    target_ids = flat_targets[valid]                              # (N_valid,)
    out_of_range = (target_ids < 0) | (target_ids >= V)
    if out_of_range.any():
        raise ValueError(f"{op}: target {target_ids[out_of_range][0]} is outside [0, {V}) and is not "
                         f"ignore_index ({ignore_index})")
    return valid, target_ids


def target_log_softmax_rows(z, target_ids, grad_scale=None):
    """log softmax(z_i)[t_i] of each row of z (n, V) -> (n,), the target's log-probability; with
    grad_scale s, z is overwritten with s * (softmax(z_i) - onehot(t_i)), which is the gradient of
    -s * log softmax(z_i)[t_i]: cross-entropy's (s = 1/N) and, with the sign turned, DPO's.

    Done in place on one slice of rows (callers hand slices to all cores with for_slices): the logits of
    GPT-2's 50,257-word vocabulary are the largest array of a training step, and they are needed only
    to produce this gradient. Plain twin: minigpt/plain_ops.py:log_softmax.
    """
    r = np.arange(len(z))
    z -= z.max(axis=1, keepdims=True)                             # the largest logit becomes 0: no overflow
    target_logprobs = z[r, target_ids]                            # (n,) a copy, for now the target's z
    np.exp(z, out=z)
    sum_exp = z.sum(axis=1, keepdims=True)                        # (n, 1)
    target_logprobs -= np.log(sum_exp[:, 0])                      # z_t - logsumexp(z)
    if grad_scale is not None:                                    # evaluation skips these passes
        z /= sum_exp                                              # softmax
        if grad_scale != 1:
            z *= grad_scale
        z[r, target_ids] -= grad_scale
    return target_logprobs


def _cross_entropy_rows(z, target_ids, need_grad=True):
    """Mean cross-entropy of the rows of z (N, V), in row slices on all cores; overwrites z with the
    loss's gradient for dloss = 1:  loss = -(1/N) sum_i log softmax(z_i)[t_i],  dz = (softmax - onehot) / N.
    """
    N = len(z)

    def rows(start, stop):
        grad_scale = 1.0 / N if need_grad else None
        return -float(np.sum(target_log_softmax_rows(z[start:stop], target_ids[start:stop], grad_scale)))
    return sum(for_slices(rows, N, row_size=z.shape[1])) / N


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX):
    """Mean cross-entropy of integer targets, fused with log-softmax; targets == ignore_index are skipped.

    Forward:  loss = (1/N_valid) * sum over valid rows i of  logsumexp(z_i) - z_i[target_i]
    Shapes:   logits (..., V), targets (...) integers -> loss () a scalar
    Backward: dlogits_i = dloss * (softmax(z_i) - onehot(target_i)) / N_valid on valid rows,
              exactly 0 on ignored rows (they never entered the loss)
    Cache:    that gradient for dloss = 1, (N_valid, V), computed in the forward
    Plain twin: minigpt/plain_ops.py:cross_entropy
    N_valid == 0 (every target ignored) raises ValueError: the mean over nothing is undefined, and a
    silent nan would poison the weights.
    """
    logits = as_float_tensor("cross_entropy", logits)
    V = logits.shape[-1]
    valid, target_ids = kept_targets("cross_entropy", targets, logits.shape[:-1], V, ignore_index)
    all_valid = len(target_ids) == valid.size
    z = logits.data.reshape(-1, V)
    dz_per_unit_dloss = z.copy() if all_valid else z[valid]      # (N_valid, V), our own copy of the logits
    loss = _cross_entropy_rows(dz_per_unit_dloss, target_ids)    # ... now overwritten with their gradient

    def backward(dloss):
        dz = dz_per_unit_dloss if dloss == 1 else dz_per_unit_dloss * dloss
        if all_valid:
            dlogits = dz
        else:
            dlogits = np.zeros((valid.size, V), dtype=z.dtype)
            dlogits[valid] = dz
        logits.accumulate_grad(dlogits.reshape(logits.shape))
    return Tensor.from_op(np.asarray(loss, dtype=logits.dtype), (logits,), backward)


def lm_head_cross_entropy(x, wte, targets, ignore_index=IGNORE_INDEX):
    """GPT-2's tied output head and the cross-entropy loss in one op (llm.c's "fused classifier").

    Forward:  z = x_valid @ wte^T;  loss = (1/N) sum_i logsumexp(z_i) - z_i[target_i]
              (x_valid: the rows of x whose target is not ignore_index; the head never runs on the others)
    Shapes:   x (..., C), wte (V, C), targets (...) -> loss ();  z (N, V), N = number of valid targets
    Backward: dz = dloss * (softmax(z) - onehot(target)) / N
              dx_valid = dz @ wte  (ignored rows of dx are 0);  dwte = dz^T @ x_valid
    Cache:    x_valid, and dz for dloss = 1, which overwrites z: the (N, V) logits, a step's largest
              array, exist once and are never stored next to their softmax or their gradient
    Plain twin: minigpt/plain_ops.py:lm_head_cross_entropy
    """
    x = as_float_tensor("lm_head_cross_entropy", x)
    V, C = wte.shape
    valid, target_ids = kept_targets("lm_head_cross_entropy", targets, x.shape[:-1], V, ignore_index)
    x2d = x.data.reshape(-1, C)                                   # (B*T, C)
    kept_rows = None if len(target_ids) == len(x2d) else np.flatnonzero(valid)
    x_valid = x2d if kept_rows is None else x2d[kept_rows]        # (N, C)
    logits = matmul(x_valid, wte.data.T)                          # (N, V)
    need_grad = is_grad_enabled() and (x.requires_grad or wte.requires_grad)
    loss = _cross_entropy_rows(logits, target_ids, need_grad)
    dz_per_unit_dloss = logits  # the same buffer, which _cross_entropy_rows overwrote with the gradient

    def backward(dloss):
        dz = dz_per_unit_dloss if dloss == 1 else dz_per_unit_dloss * dloss
        if x.requires_grad:
            dx_valid = matmul(dz, wte.data)                       # (N, C)
            if kept_rows is None:
                dx = dx_valid
            else:
                dx = np.zeros_like(x2d)
                dx[kept_rows] = dx_valid
            x.accumulate_grad(dx.reshape(x.shape), owned=True)
        if wte.requires_grad:
            wte.accumulate_grad(matmul_tn(dz, x_valid), owned=True)  # (V, C)
    return Tensor.from_op(np.asarray(loss, dtype=x.dtype), (x, wte), backward)
