"""Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness and llm.c score them.

A question is a context and K choices. Choice k is appended to the context as its continuation,
delimiter + choice_k (" Paris" after "The capital of France is"), and only the continuation's tokens
are scored, each given everything before it:

    ll_k = sum over j = 1..n_k of log p(c_kj | context, c_k1 .. c_k(j-1))    c_k: the continuation's n_k ids

The model's pick, in the three conventions the field reports (each named so in every output):

    acc                argmax_k ll_k                   the likeliest continuation
    acc_norm_chars     argmax_k ll_k / len(choice_k)   lm-evaluation-harness's acc_norm: per character of
                                                       the choice text (its leading delimiter not counted)
    acc_norm_tokens    argmax_k ll_k / n_k             llm.c's acc_norm (dev/data/hellaswag.py): the mean
                                                       over its tokens, i.e. the lowest mean loss

A long choice collects more negative terms than a short one, so acc favours short choices; the two
acc_norm divide that out, by a length that does not depend on the tokenizer (characters) or by one that
does (tokens). np.argmax breaks ties towards the first choice, as both references do.

Tokens: context and continuation are encoded separately and joined (llm.c's way; the harness encodes
them joined and splits, which gives the same ids whenever the continuation starts with a space, since
GPT-2's pre-tokenizer never merges across one). An empty context becomes <|endoftext|> (the harness's).
A question longer than the model's context keeps the end of its context, T + 1 - max_k n_k tokens
(T: the model's context length; the last continuation token is scored but never read), and the number
of questions cut so is reported.

The work, a batch of questions at a time (`choice_logprobs`):
    separate rows    each choice is its own row, context + continuation, right-padded (llm.c's way)
    shared context   each question's context runs once, left-padded, into a KV cache; the cache's rows
                     are repeated for the question's choices and the continuations run after it. The
                     context is computed once instead of K times, and for MMLU's letters (one-token
                     continuations) no continuation pass is needed at all. Measured at GPT-2 124M's
                     shape: 2.5x (HellaSwag-like) and 3.3x (MMLU letters) the questions per second of
                     separate rows (benchmarks/multiple_choice_speed.py, docs/evaluation.md)
Both end in the op DPO uses, dpo.sequence_logprobs(x, wte, targets, "sum"), over the positions that
predict a continuation token (the output head runs on those only). tests/test_multiple_choice.py checks
both against log_softmax of the model's full logits.
"""
import math
import sys
import time
from typing import NamedTuple

import numpy as np

from ..dpo import sequence_logprobs
from ..losses import IGNORE_INDEX
from ..model import KVCache
from ..nn import eval_mode
from ..tensor import no_grad
from ..tokenizer import encode
from ..training import format_duration

CONVENTIONS = {
    "acc": "highest summed log-likelihood",
    "acc_norm_chars": "highest log-likelihood per character of the choice (lm-evaluation-harness's acc_norm)",
    "acc_norm_tokens": "highest mean log-likelihood per token (llm.c's acc_norm)",
}
MAX_ROWS = 64                    # choice rows scored together, at most
ACTIVATION_BYTES = 256 << 20     # and at most this much KV cache / activations: rows x width x layers x C x 8


class Question(NamedTuple):
    context: str
    choices: tuple        # the answer texts: acc_norm_chars divides by their lengths
    answer: int           # index of the right choice
    delimiter: str = " "  # put between the context and each choice
    group: str = ""       # a subject or a task kind: accuracy is also reported per group


def encode_question(tokenizer, question, context_length):
    """(context ids, [continuation ids of each choice], cut): the context's end only, `cut` True, when
    context + the longest continuation would not fit `context_length` + 1 tokens (see the module's doc)."""
    continuations = [encode(tokenizer, question.delimiter + choice) for choice in question.choices]
    longest = max(len(ids) for ids in continuations)
    if min(len(ids) for ids in continuations) == 0:
        raise ValueError(f"a choice of {question.choices!r} has no tokens to score")
    if longest > context_length:
        raise ValueError(f"a choice of {longest} tokens does not fit the model's context of {context_length}")
    context = encode(tokenizer, question.context) or [tokenizer.eot_token]
    room = context_length + 1 - longest
    return context[-room:], continuations, len(context) > room


def choice_logprobs(model, contexts, continuations, share_context=True):
    """Summed log-probability of every continuation given its context, for one batch of questions.

    contexts: Q lists of ids; continuations: for each question, its K_q lists of ids (each >= 1 id).
    Returns (R,), R = sum_q K_q, the choices in order. Run under no_grad, in eval mode.
    """
    counts = [len(question) for question in continuations]
    rows = [ids for question in continuations for ids in question]
    states = _shared_context_states if share_context else _separate_row_states
    x, targets = states(model, contexts, rows, counts)                   # (R, T, C), (R, T)
    return sequence_logprobs(x, model.wte.weight, targets, reduction="sum").data   # (R,)


def _shared_context_states(model, contexts, rows, counts):
    """The hidden states that predict each continuation token, (R, n, C), and those tokens, (R, n):
    column 0 from the context's last position (computed once per question), column j from continuation
    token j - 1, read after the context's KV cache; n is the longest continuation."""
    L, n = max(len(ids) for ids in contexts), max(len(ids) for ids in rows)
    pad = np.array([L - len(ids) for ids in contexts])                   # (Q,) left padding
    idx = np.zeros((len(contexts), L), dtype=np.int64)                   # (Q, L)
    for q, ids in enumerate(contexts):
        idx[q, pad[q]:] = ids
    targets = np.full((len(rows), n), IGNORE_INDEX, dtype=np.int64)      # (R, n): token j at column j
    read = np.zeros((len(rows), n - 1), dtype=np.int64)                  # (R, n-1): all but the last token,
    for r, ids in enumerate(rows):                                       # right-padded: padding is never
        targets[r, :len(ids)] = ids                                      # read by a real position (causal)
        read[r, :len(ids) - 1] = ids[:-1]
    cache = KVCache(model.cfg, len(contexts), L + n - 1, model.dtype, pad)
    last_positions = np.arange(len(contexts)) * L + L - 1                # (Q,) flat q*L + L-1
    context_states = model.hidden_states(idx, kv_cache=cache, rows=last_positions).data   # (Q, C)
    last = np.repeat(context_states[:, None], counts, axis=0)            # (R, 1, C)
    if n == 1:                                                           # one-token continuations: done
        return last, targets
    cache.repeat_rows(counts)                                            # Q -> R rows
    continued = model.hidden_states(read, kv_cache=cache).data           # (R, n-1, C)
    return np.concatenate([last, continued], axis=1), targets            # (R, n, C)


def _separate_row_states(model, contexts, rows, counts):
    """Each choice as its own row, context + continuation but its last token, right-padded: the hidden
    states (R, T, C), and (R, T) targets, the continuation's tokens at the positions that predict them."""
    row_contexts = [ids for ids, count in zip(contexts, counts) for _ in range(count)]
    T = max(len(c) + len(ids) - 1 for c, ids in zip(row_contexts, rows))
    idx = np.zeros((len(rows), T), dtype=np.int64)                       # (R, T)
    targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)      # (R, T)
    for r, (context, ids) in enumerate(zip(row_contexts, rows)):
        sequence = context + ids[:-1]
        idx[r, :len(sequence)] = sequence
        targets[r, len(context) - 1:len(sequence)] = ids                 # position t predicts token t + 1
    return model.hidden_states(idx).data, targets                        # (R, T, C), (R, T)


def question_batches(encoded, cfg, share_context=True):
    """Lists of question indices scored together: similar lengths together, each batch within MAX_ROWS
    choice rows and ACTIVATION_BYTES, and (shared context) its longest context plus its longest
    continuation within the model's context."""
    def widths(i):
        context, continuations, _ = encoded[i]
        return len(context), max(len(ids) for ids in continuations), len(continuations)
    order = sorted(range(len(encoded)), key=lambda i: sum(widths(i)[:2]))
    batches, batch, L, n, rows = [], [], 0, 0, 0
    for i in order:
        context_length, longest, k = widths(i)
        new_L, new_n, new_rows = max(L, context_length), max(n, longest), rows + k
        width = new_L + new_n - 1
        too_big = (new_rows > MAX_ROWS or new_rows * width * cfg.n_layers * cfg.emb_dim * 8 > ACTIVATION_BYTES
                   or (share_context and width > cfg.context_length))
        if batch and too_big:
            batches.append(batch)
            batch, new_L, new_n, new_rows = [], context_length, longest, k
        batch.append(i)
        L, n, rows = new_L, new_n, new_rows
    return batches + [batch] if batch else batches


class Scores(NamedTuple):
    logprobs: list        # per question, (K,) summed log-likelihood of each choice
    token_counts: list    # per question, (K,) tokens of each continuation
    cut: int              # questions whose context lost its start to the model's context length
    seconds: float


def score_questions(model, tokenizer, questions, share_context=True, progress=True):
    """The log-likelihoods of every question's choices (Scores), in batches; a progress line on stderr."""
    encoded = [encode_question(tokenizer, q, model.cfg.context_length) for q in questions]
    logprobs = [None] * len(questions)
    start = last_print = time.monotonic()
    with no_grad(), eval_mode(model):
        for batch in question_batches(encoded, model.cfg, share_context):
            flat = choice_logprobs(model, [encoded[i][0] for i in batch], [encoded[i][1] for i in batch],
                                   share_context)
            for i, piece in zip(batch, np.split(flat, np.cumsum([len(encoded[i][1]) for i in batch])[:-1])):
                logprobs[i] = piece.astype(np.float64)
            now = time.monotonic()
            if progress and now - last_print > 0.5:
                last_print = now
                done = sum(lp is not None for lp in logprobs)
                eta = format_duration((len(questions) - done) * (now - start) / done)
                print(f"\rquestions: {done}/{len(questions)}, ETA {eta}  ", end="", file=sys.stderr,
                      flush=True)
    if progress and time.monotonic() - start > 0.5:
        print(file=sys.stderr)
    token_counts = [np.array([len(ids) for ids in continuations]) for _, continuations, _ in encoded]
    return Scores(logprobs, token_counts, sum(cut for _, _, cut in encoded), time.monotonic() - start)


def picks(question, logprobs, token_counts):
    """{convention: index of the choice picked} for one question (see CONVENTIONS)."""
    characters = np.array([max(len(choice), 1) for choice in question.choices])   # (K,)
    return {"acc": int(np.argmax(logprobs)),
            "acc_norm_chars": int(np.argmax(logprobs / characters)),
            "acc_norm_tokens": int(np.argmax(logprobs / token_counts))}


def chance(choice_counts):
    """(expected accuracy of guessing, (low, high)): the range that holds a guesser's accuracy on these
    questions 95% of the time. A question with K choices is right with p = 1/K; over n questions the
    accuracy has mean p_bar = mean(p) and standard deviation sqrt(sum p(1 - p)) / n; the range is
    p_bar +- 1.96 of those (normal approximation), within [0, 1]. A score above `high` beats chance."""
    p = 1.0 / np.asarray(choice_counts, dtype=np.float64)               # (n,)
    mean, spread = float(p.mean()), 1.96 * math.sqrt(float((p * (1 - p)).sum())) / len(p)
    return mean, (max(0.0, mean - spread), min(1.0, mean + spread))


def summarize(questions, scores):
    """Accuracy in every convention, overall and per group, beside chance; and each question's record."""
    records, groups = [], {}
    for question, logprobs, counts in zip(questions, scores.logprobs, scores.token_counts, strict=True):
        picked = picks(question, logprobs, counts)
        records.append({"group": question.group, "answer": question.answer, "picked": picked,
                        "logprobs": [round(float(lp), 4) for lp in logprobs], "tokens": counts.tolist()})
        groups.setdefault(question.group, []).append(records[-1])
    expected, (low, high) = chance([len(q.choices) for q in questions])
    return {"questions": len(questions), **_accuracies(records), "chance": expected, "chance_95": [low, high],
            "contexts_cut": scores.cut, "seconds": scores.seconds,
            "groups": {name: {"questions": len(members), **_accuracies(members)}
                       for name, members in sorted(groups.items())},
            "per_question": records}


def _accuracies(records):
    return {convention: sum(r["picked"][convention] == r["answer"] for r in records) / len(records)
            for convention in CONVENTIONS}
