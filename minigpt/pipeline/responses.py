"""Responses to the test set: greedy decoding with the KV cache, in batches of prompts of any lengths.

Prompts are sorted by length (so a batch's rows need little padding) and cut into batches that
`minigpt.generate` decodes together, left-padded. The batch is bigger than a training batch: decoding
one token costs little more for many rows than for one, so the limit is the KV cache's memory.
An entry's prompt is its conversation up to its last reply (prompts.reply_prompt; an Alpaca entry's is its
instruction, input and response header), so a conversation's test answers its last turn given the history.
A row stops at <|endoftext|>; its response is the text of the new tokens up to the first <|endoftext|>
or the template's end of a turn (prompts.reply_end: <|end|> with chat), stripped of surrounding
whitespace. The output mirrors rasbt's instruction-data-with-response.json.
"""
import sys
import time

import numpy as np

from ..data import reply_prompt_ids
from ..generation import generate
from ..nn import eval_mode
from ..prompts import conversation_of, reply_end
from ..training import format_duration

MAX_BATCH = 64                 # prompts decoded together, at most
KV_CACHE_BYTES = 512 << 20     # and at most this much KV cache (float32 keys and values of every layer)


def prompt_ids(tokenizer, entry, style):
    """The token ids the model is given: the conversation before its last reply, and the reply's header,
    tokenized as training tokenizes it (data.reply_prompt_ids)."""
    messages = conversation_of(entry)
    history = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return reply_prompt_ids(tokenizer, history, style)


def decode_response(tokenizer, new_ids, style):
    """Text of generated ids up to (not including) the first <|endoftext|> and the first end of a turn of
    `style`'s template, stripped."""
    new_ids = list(new_ids)
    if tokenizer.eot_token in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eot_token)]
    text, end = tokenizer.decode(new_ids), reply_end(style)
    return (text.split(end)[0] if end else text).strip()


def generate_responses(model, tokenizer, entries, style, max_new_tokens, batch_size=None, progress=True):
    """Greedy responses (strings) to `entries`, in their order; a progress line on stderr if `progress`.

    batch_size: prompts decoded together (default: as many as KV_CACHE_BYTES allows, at most 64).
    """
    prompts = [prompt_ids(tokenizer, entry, style) for entry in entries]
    batches = response_batches(model.cfg, prompts, max_new_tokens, batch_size)
    responses = [None] * len(entries)
    start = last_print = time.monotonic()
    with eval_mode(model):  # no dropout while generating
        for batch in batches:
            # alone, a prompt may outgrow the context window (then the window slides): a (1, T) array
            batch_prompts = np.array([prompts[batch[0]]]) if len(batch) == 1 else [prompts[i] for i in batch]
            outputs = generate(model, batch_prompts, max_new_tokens, eos_id=tokenizer.eot_token)
            for i, ids in zip(batch, outputs):
                responses[i] = decode_response(tokenizer, ids[len(prompts[i]):], style)
            now = time.monotonic()
            if progress and (now - last_print > 0.5 or batch is batches[-1]):  # ~2 updates a second
                last_print = now
                _print_progress(sum(r is not None for r in responses), len(entries), time.monotonic() - start)
    if progress and entries:
        print(file=sys.stderr)
    return responses


def response_batches(cfg, prompts, max_new_tokens, batch_size=None):
    """Lists of prompt indices, decoded together: shortest prompts first, each batch's KV cache within
    KV_CACHE_BYTES; a prompt that would outgrow the context window with its new tokens goes alone."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    fits = [i for i in order if len(prompts[i]) + max_new_tokens <= cfg.context_length]
    too_long = [[i] for i in order if len(prompts[i]) + max_new_tokens > cfg.context_length]
    batches, batch = [], []
    for i in fits:
        rows = len(batch) + 1
        cache_bytes = rows * (len(prompts[i]) + max_new_tokens) * cfg.n_layers * cfg.emb_dim * 8  # 2 float32s
        if batch and (rows > (batch_size or MAX_BATCH) or cache_bytes > KV_CACHE_BYTES):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches + too_long


def with_responses(entries, responses):
    """Copies of the entries with "model_response" added, as in instruction-data-with-response.json."""
    return [dict(entry, model_response=response) for entry, response in zip(entries, responses, strict=True)]


def _print_progress(done, total, elapsed):
    rate = done / max(elapsed, 1e-9)
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    print(f"\rtest responses: {done}/{total} ({100 * done / total:.0f}%), {rate:.1f}/s, ETA {eta}",
          end="", file=sys.stderr, flush=True)
