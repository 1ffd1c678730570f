"""Text generation: greedy or temperature/top-k sampling, one token at a time, with a KV cache.

Without a cache every new token re-runs the whole prefix through the model. With one, the keys and
values of earlier positions are kept per layer, so each step feeds only the newest token: its work is
one position, not T. GPT-2's positions are absolute, so once the text outgrows the context window
every step must re-run the cropped window from scratch, cache or not.

Prompts of different lengths share a batch by left padding: each row is right-aligned, its padding
is never attended to and its positions count from its own first token (see KVCache), so every row
gets exactly the tokens it would get alone. Decoding one token costs about as much for 32 rows as for
one (the time goes into reading the weights), so a full batch of ragged prompts is much faster than
small batches of prompts that happen to have equal lengths.

A chat keeps one sequence's cache between turns (`CachedContext`): each turn runs only the tokens after
what is already cached, its new message, not the whole conversation again.
"""
import numpy as np

from .model import KVCache
from .tensor import no_grad


def generate(model, prompts, max_new_tokens, context_size=None, temperature=0.0, top_k=None, eos_id=None,
             rng=None, use_cache=True):
    """Extend each prompt by up to max_new_tokens tokens.

    prompts: token ids (B, T), or a list of B sequences of ids of any lengths (a ragged batch, which
    must fit the context window with its new tokens). Returns (B, T + new) ids for a (B, T) array, and
    a list of 1-d arrays, each prompt followed by its new tokens, for a list.
    temperature 0 picks the most likely token (greedy); above 0 samples from softmax(logits / temperature),
    restricted to the top_k most likely tokens when top_k is given, drawing from `rng`.
    eos_id: a row stops at this token (which is kept); rows that stopped are padded with it, and
    generation ends when every row has stopped.
    """
    new_columns = [column[:, None] for column in generate_tokens(
        model, prompts, max_new_tokens, context_size, temperature, top_k, eos_id, rng, use_cache)]
    new = np.concatenate(new_columns, axis=1) if new_columns else np.zeros((len(prompts), 0), np.int64)
    if isinstance(prompts, np.ndarray):
        return np.concatenate([prompts, new], axis=1)
    return [np.concatenate([np.asarray(prompt, dtype=np.int64), row]) for prompt, row in zip(prompts, new)]


def generate_tokens(model, prompts, max_new_tokens, context_size=None, temperature=0.0, top_k=None,
                    eos_id=None, rng=None, use_cache=True):
    """Yield the next token of every row, (B,), as soon as it is chosen (for streaming output)."""
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"generate: invalid max_new_tokens={max_new_tokens}, temperature={temperature}, "
                         f"top_k={top_k}")
    context_size = min(context_size or model.cfg.context_length, model.cfg.context_length)
    idx, pad = _left_padded(prompts, max_new_tokens, context_size, use_cache)   # (B, T), (B,)
    rng = rng if rng is not None else np.random.default_rng()
    finished = np.zeros(len(idx), dtype=bool)
    cache = None
    if use_cache:
        max_length = min(context_size, idx.shape[1] + max_new_tokens)
        cache = KVCache(model.cfg, len(idx), max_length, model.dtype, pad)

    with no_grad():
        logits = model(idx[:, -context_size:], kv_cache=cache, last_only=True)
        for _ in range(max_new_tokens):
            next_ids = pick_next_token(logits.data[:, -1], temperature, top_k, rng)   # (B,)
            if eos_id is not None:
                next_ids[finished] = eos_id
                finished |= next_ids == eos_id
            yield next_ids
            if finished.all():
                return
            idx = np.concatenate([idx, next_ids[:, None]], axis=1)
            if cache is not None and cache.length < cache.max_length:
                logits = model(next_ids[:, None], kv_cache=cache, last_only=True)   # one position
            else:
                cache = None  # the window slid: every position moved, so cached keys are stale
                logits = model(idx[:, -context_size:], last_only=True)


def _left_padded(prompts, max_new_tokens, context_size, use_cache):
    """(ids (B, T), pad (B,)): the prompts right-aligned in one array, and each row's left padding."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise ValueError(f"generate needs token ids of shape (batch, time) with at least one token, "
                             f"got {prompts.shape}")
        return prompts, np.zeros(len(prompts), dtype=np.int64)
    lengths = np.array([len(prompt) for prompt in prompts])                     # (B,)
    if len(lengths) == 0 or lengths.min() == 0:
        raise ValueError("generate needs at least one prompt, each with at least one token")
    T = int(lengths.max())
    if T + max_new_tokens > context_size or not use_cache:
        raise ValueError(f"a batch of prompts of different lengths needs the KV cache and must fit the "
                         f"context window: longest prompt {T} + {max_new_tokens} new tokens > "
                         f"{context_size}; "
                         f"generate such prompts one at a time")
    idx = np.zeros((len(lengths), T), dtype=np.int64)                          # padding: token 0, never seen
    for row, prompt in zip(idx, prompts):
        row[T - len(prompt):] = prompt
    return idx, T - lengths


def pick_next_token(logits, temperature=0.0, top_k=None, rng=None):
    """Choose one token id per row from logits (B, V): argmax, or a sample at the given temperature."""
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]   # (B, 1)
        logits = np.where(logits < kth_largest, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(probs, axis=-1)                                         # (B, V)
    draws = rng.random(len(logits)) * cumulative[:, -1]                            # (B,) in [0, total)
    return np.minimum((cumulative <= draws[:, None]).sum(axis=-1), logits.shape[-1] - 1)


class CachedContext:
    """One sequence of token ids whose keys and values stay in a KV cache between calls: a chat's history.

    Each call is given the whole sequence; only the tokens after the longest prefix it shares with the
    cached ones run through the model, so a chat's new turn costs its new tokens, not the conversation.
    Positions are absolute: a sequence that changed early (its oldest turns dropped) runs again from the
    first token that differs. Interrupted mid-step (Ctrl-C), the cache still holds a correct prefix.
    """

    def __init__(self, model):
        self.model = model
        self.cache = KVCache(model.cfg, 1, model.cfg.context_length, model.dtype)
        self.ids = []   # the cache holds the keys and values of self.ids[:self.cache.length]

    def shared_length(self, ids):
        """How many leading tokens of `ids` (a list) have their keys and values in the cache."""
        n = min(len(ids), self.cache.length)
        if ids[:n] == self.ids[:n]:
            return n
        return next(i for i in range(n) if ids[i] != self.ids[i])

    def next_logits(self, ids):
        """Logits (V,) of the token after `ids` (a list of 1 .. context_length ids), from the cache."""
        start = min(self.shared_length(ids), len(ids) - 1)   # the last token always runs: its logits count
        self.cache.truncate(start)
        self.ids = list(ids)
        with no_grad():
            logits = self.model(np.array([ids[start:]], dtype=np.int64), kv_cache=self.cache, last_only=True)
        return logits.data[0, -1]                                    # (1, 1, V) -> (V,)

    def generate(self, ids, max_new_tokens, temperature=0.0, top_k=None, rng=None, eos_id=None):
        """Yield up to max_new_tokens token ids after `ids`, one at a time, as generate_tokens does for one
        row; stops after eos_id. The history and its reply must fit the context window."""
        if not ids or len(ids) + max_new_tokens > self.model.cfg.context_length:
            raise ValueError(f"{len(ids)} tokens + {max_new_tokens} new ones do not fit the context window "
                             f"of {self.model.cfg.context_length} tokens (or there is no token to continue)")
        rng = rng if rng is not None else np.random.default_rng()
        ids = list(ids)
        logits = self.next_logits(ids)
        for n in range(max_new_tokens):
            token = int(pick_next_token(logits[None], temperature, top_k, rng)[0])
            yield token
            if token == eos_id or n == max_new_tokens - 1:           # the last token needs no logits
                return
            ids.append(token)
            logits = self.next_logits(ids)                           # runs this one token
