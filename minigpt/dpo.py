"""Direct Preference Optimization (DPO; Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

For a prompt x with a preferred response y_c ("chosen") and a dispreferred one y_r ("rejected"), the
policy pi (the model being trained) and a frozen reference model ref (the fine-tuned starting point):

    z    = beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)))
    loss = -mean over the batch of log sigmoid(z)

The loss raises the policy's margin between the two responses relative to the reference; beta (0.1
by default) sets how far the policy may move from the reference. beta * (log pi - log ref) is a
response's implicit reward, reported with its margin and accuracy (the reference notebook prints
log pi - log ref without beta: its rewards and margins are ours divided by beta).

log pi(y|x) here is the MEAN log-probability of the response's tokens and its closing <|endoftext|>,
not the paper's sum: with the sum, a response's log-probability ratios and their gradient grow with its
length, so the reference's beta 0.1 and lr 5e-6 would act more strongly on a 60-token answer than on a
5-token one; the mean puts every pair on one scale. The reference notebook (rasbt's dpo-from-scratch)
takes a mean too, over other positions: the response header's tokens and the response, without the
end-of-text (docs/reading-guide.md, "Conventions"). `reduction="sum"` gives the paper's sum.

Ops (in the gradient-check registry of tests/test_gradcheck.py):
    sequence_logprobs   hidden states + tied head -> per-sequence log-probability (B,)
    dpo_loss            policy and reference log-probabilities -> the loss ()
The reference model's log-probabilities never change, so `reference_logprobs` computes them once per
example under no_grad, and `dpo_batch_loss` (what a training loop calls) runs the policy only.
"""
import numbers
from dataclasses import dataclass

import numpy as np

from .losses import IGNORE_INDEX, kept_targets, target_log_softmax_rows
from .nn import eval_mode
from .ops import as_float_tensor
from .cpu.parallel import for_slices, matmul, matmul_tn
from .tensor import Tensor, is_grad_enabled, no_grad

DEFAULT_BETA = 0.1
REDUCTIONS = ("mean", "sum")


def _target_logprobs(z, target_ids, need_grad):
    """log softmax(z_i)[t_i] for each row of z (N, V), in row slices on all cores; with need_grad, z is
    overwritten with softmax(z_i) - onehot(t_i), the gradient of -log softmax(z_i)[t_i]."""
    token_logprobs = np.empty(len(z), dtype=z.dtype)              # (N,)

    def rows(start, stop):
        token_logprobs[start:stop] = target_log_softmax_rows(z[start:stop], target_ids[start:stop],
                                                             1.0 if need_grad else None)
    for_slices(rows, len(z), row_size=z.shape[1])
    return token_logprobs


def sequence_logprobs(x, wte, targets, reduction="mean", ignore_index=IGNORE_INDEX):
    """Log-probability of each sequence's kept targets under GPT-2's tied output head, fused.

    Forward:  z_i = x_i @ wte^T for each kept row i (target != ignore_index; the head never runs on
              the others);  lp_i = z_i[t_i] - logsumexp(z_i)
              logp_b = w_b * sum of lp_i over the kept rows i of sequence b,
              w_b = 1 / n_b for reduction "mean" (n_b = kept rows of sequence b), 1 for "sum"
    Shapes:   x (B, T, C), wte (V, C), targets (B, T) -> logp (B,);  z (N, V), N = kept rows
    Backward: s_i = dlogp_b(i) * w_b(i);   dz_i = s_i * (onehot(t_i) - softmax(z_i))
              dx_i = s_i * ((onehot - softmax)_i @ wte), 0 on ignored rows
              dwte = (onehot - softmax)^T @ (s * x_kept)
    Cache:    x_kept (N, C), and softmax - onehot (N, V), which overwrites z: the logits exist once
              (the shared row helper keeps cross-entropy's sign, so the backward turns the scales' sign).
              The row scales s are applied to the (N, C) side of each product, never to the (N, V) array.
    A sequence with no kept target has no log-probability: ValueError.
    Plain twin: minigpt/plain_ops.py:sequence_logprobs.
    """
    x = as_float_tensor("sequence_logprobs", x)
    if reduction not in REDUCTIONS:
        raise ValueError(f"sequence_logprobs: reduction must be one of {', '.join(REDUCTIONS)}, "
                         f"got {reduction!r}")
    if x.ndim != 3:
        raise ValueError(f"sequence_logprobs: x must be (B, T, C), got shape {x.shape}")
    B, T, C = x.shape
    V = wte.shape[0]
    valid, target_ids = kept_targets("sequence_logprobs", targets, (B, T), V, ignore_index)
    kept_rows = np.flatnonzero(valid)                             # (N,) flat row b*T + t
    row_sequence = kept_rows // T                                 # (N,) b of each kept row
    counts = np.bincount(row_sequence, minlength=B)               # (B,) n_b
    if not counts.all():
        empty = np.flatnonzero(counts == 0)[0]
        raise ValueError(f"sequence_logprobs: sequence {empty} has no target that is not ignore_index "
                         f"({ignore_index}), so it has no log-probability")
    weights = (1.0 / counts if reduction == "mean" else np.ones(B)).astype(x.dtype)  # (B,) w_b
    x_kept = x.data.reshape(-1, C)[kept_rows]                     # (N, C)
    logits = matmul(x_kept, wte.data.T)                           # (N, V)
    need_grad = is_grad_enabled() and (x.requires_grad or wte.requires_grad)
    token_logprobs = _target_logprobs(logits, target_ids, need_grad)  # (N,)
    softmax_minus_onehot = logits  # the same buffer: _target_logprobs overwrote the logits with it
    logp = np.bincount(row_sequence, weights=token_logprobs, minlength=B).astype(x.dtype) * weights  # (B,)

    def backward(dlogp):
        minus_row_scale = -(dlogp * weights)[row_sequence][:, None]  # (N, 1) -s_i: onehot - softmax = -(...)
        if x.requires_grad:
            dx = np.zeros((B * T, C), dtype=x.dtype)
            dx[kept_rows] = minus_row_scale * matmul(softmax_minus_onehot, wte.data)  # (N, C)
            x.accumulate_grad(dx.reshape(x.shape), owned=True)
        if wte.requires_grad:
            dwte = matmul_tn(softmax_minus_onehot, minus_row_scale * x_kept)   # (V, C)
            wte.accumulate_grad(dwte, owned=True)
    return Tensor.from_op(logp, (x, wte), backward)


def _constant_logprobs(op, name, values, B, dtype):
    values = np.asarray(values.data if isinstance(values, Tensor) else values, dtype=dtype)
    if values.shape != (B,):
        raise ValueError(f"{op}: {name} has shape {values.shape}, expected ({B},) like the policy's")
    if not np.isfinite(values).all():
        raise ValueError(f"{op}: {name} holds a non-finite value")
    return values


FLOAT32_MAX = float(np.finfo(np.float32).max)  # log-probabilities are float32: a larger factor makes them inf


def check_beta(beta):
    """Raise ValueError unless beta (the DPO loss's, a run's --beta) is a finite positive number that float32
    log-probabilities can be multiplied by."""
    if isinstance(beta, bool) or not (isinstance(beta, numbers.Real) and np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if beta > FLOAT32_MAX:
        raise ValueError(f"beta {beta:g} is too large to train: beta times a log-probability overflows "
                         f"float32 (at most {FLOAT32_MAX:.3g})")


def check_nll_weight(nll_weight):
    """Raise ValueError unless nll_weight (dpo_batch_loss's, a run's --nll-weight) is a finite number >= 0
    that float32 log-probabilities can be multiplied by."""
    if isinstance(nll_weight, bool) or not (isinstance(nll_weight, numbers.Real) and np.isfinite(nll_weight)
                                            and nll_weight >= 0):
        raise ValueError(f"nll_weight must be a finite number >= 0 (0: plain DPO), got {nll_weight!r}")
    if nll_weight > FLOAT32_MAX:
        raise ValueError(f"nll_weight {nll_weight:g} is too large to train: it times a log-probability "
                         f"overflows float32 (at most {FLOAT32_MAX:.3g})")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=DEFAULT_BETA):
    """The DPO loss of a batch of B preference pairs.

    Forward:  z_b = beta * ((pc_b - rc_b) - (pr_b - rr_b));   loss = (1/B) sum_b -log sigmoid(z_b)
              -log sigmoid(z) = softplus(-z) = logaddexp(0, -z), finite for any z
    Shapes:   pc, pr (B,) policy log-probabilities; rc, rr (B,) reference log-probabilities -> loss ()
    Backward: g_b = beta * sigmoid(-z_b) / B;   dpc_b = -dloss * g_b;   dpr_b = +dloss * g_b
              (d softplus(-z)/dz = -sigmoid(-z)); rc, rr are constants of the frozen reference: no gradient
    Cache:    g (B,); sigmoid(-z) = exp(-logaddexp(0, z)), which neither overflows nor divides by 0
    A pair the policy already ranks far above the reference (z >> 0) gets a vanishing gradient.
    """
    pc = as_float_tensor("dpo_loss", policy_chosen)
    pr = as_float_tensor("dpo_loss", policy_rejected)
    check_beta(beta)
    if pc.ndim != 1 or not pc.size or pc.shape != pr.shape or pc.dtype != pr.dtype:
        raise ValueError(f"dpo_loss: policy_chosen and policy_rejected must be (B,), B >= 1, of one dtype, "
                         f"got {pc.shape} {pc.dtype} and {pr.shape} {pr.dtype}")
    B = pc.shape[0]
    rc = _constant_logprobs("dpo_loss", "ref_chosen", ref_chosen, B, pc.dtype)
    rr = _constant_logprobs("dpo_loss", "ref_rejected", ref_rejected, B, pc.dtype)
    z = beta * ((pc.data - rc) - (pr.data - rr))                  # (B,)
    loss = np.logaddexp(0.0, -z).mean()
    g = np.exp(-np.logaddexp(0.0, z)) * (beta / B)               # (B,)

    def backward(dloss):
        if pc.requires_grad:
            pc.accumulate_grad(-dloss * g, owned=True)
        if pr.requires_grad:
            pr.accumulate_grad(dloss * g, owned=True)
    return Tensor.from_op(np.asarray(loss, dtype=pc.dtype), (pc, pr), backward)


def reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=DEFAULT_BETA):
    """Plain numbers, no gradient: the batch means of the implicit rewards beta * (log pi - log ref) of the
    chosen and rejected responses, of their margin, and the reward accuracy, the fraction of pairs whose
    chosen reward is strictly above the rejected one (so 0 at the start, when policy == reference)."""
    check_beta(beta)
    pc, pr, rc, rr = (np.asarray(v.data if isinstance(v, Tensor) else v, dtype=np.float64)
                      for v in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)   # (B,), (B,)
    return {"chosen_reward": float(chosen_rewards.mean()), "rejected_reward": float(rejected_rewards.mean()),
            "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
            "reward_accuracy": float((chosen_rewards > rejected_rewards).mean())}


def batch_logprobs(model, batch, reduction="mean"):
    """(2B,) log-probabilities of a PreferenceBatch: its B chosen, then its B rejected responses, in one
    forward pass over the (2B, T) batch."""
    return sequence_logprobs(model.hidden_states(batch.inputs), model.wte.weight, batch.targets, reduction)


@dataclass
class ReferenceLogprobs:
    """The frozen reference model's log-probabilities of every pair of one PreferenceDataset."""
    chosen: np.ndarray     # (N,) log ref(chosen_i | prompt_i)
    rejected: np.ndarray   # (N,) log ref(rejected_i | prompt_i)
    reduction: str         # "mean" or "sum", as passed to sequence_logprobs
    fingerprint: str       # the dataset's: a batch of another dataset is refused


def reference_logprobs(reference_model, dataset, batch_size=8, reduction="mean"):
    """Run the reference model over the whole dataset once, under no_grad and in eval mode (no dropout).

    A training step then looks up its pairs' values instead of running a second model: it saves one
    forward pass per step, and the reference model need not stay in memory while training.
    """
    chosen, rejected = np.empty(len(dataset)), np.empty(len(dataset))   # (N,), (N,)
    with eval_mode(reference_model), no_grad():
        for batch in dataset.batches(batch_size):
            logp = batch_logprobs(reference_model, batch, reduction).data   # (2B,)
            chosen[batch.indices], rejected[batch.indices] = logp[:batch.size], logp[batch.size:]
    return ReferenceLogprobs(chosen, rejected, reduction, dataset.fingerprint)


def dpo_batch_loss(policy, batch, ref_logps, beta=DEFAULT_BETA, nll_weight=0.0):
    """(loss Tensor, metrics dict) for one PreferenceBatch: the step a training loop calls.

    The policy runs once over the batch's 2B sequences; the reference's values come from ref_logps
    (reference_logprobs of the batch's dataset). metrics holds the loss and reward_metrics as floats.

    nll_weight > 0 adds the chosen responses' negative log-likelihood (RPO: Pang et al. 2024,
    https://arxiv.org/abs/2404.19733):

        loss = dpo_loss + nll_weight * chosen_nll,    chosen_nll = -mean over the batch of log pi(y_c|x)

    Plain DPO asks only for a margin, which it can also widen by lowering the chosen response's own
    probability ("likelihood displacement"); the NLL term keeps the chosen response likely. Its gradient
    is the engine's mean and mul, so it needs no op of its own. metrics then adds dpo_loss and chosen_nll.
    """
    if batch.fingerprint != ref_logps.fingerprint:
        raise ValueError("the reference log-probabilities were computed for another dataset (other entries, "
                         "tokenizer, prompt style or allowed length): compute them with "
                         "reference_logprobs(reference_model, dataset) for this batch's dataset")
    check_nll_weight(nll_weight)
    logp = batch_logprobs(policy, batch, ref_logps.reduction)                 # (2B,)
    policy_chosen, policy_rejected = logp[:batch.size], logp[batch.size:]     # (B,), (B,)
    ref_chosen, ref_rejected = ref_logps.chosen[batch.indices], ref_logps.rejected[batch.indices]
    loss = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    metrics = reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if nll_weight:
        chosen_nll = -policy_chosen.mean()
        metrics.update(dpo_loss=loss.item(), chosen_nll=chosen_nll.item())
        loss = loss + nll_weight * chosen_nll
    return loss, {"loss": loss.item(), **metrics}
