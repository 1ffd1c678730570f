"""Responses to the test set: greedy decoding with the KV cache, batched by prompt length.

`minigpt.generate` takes a rectangular batch (B, T), so prompts are grouped by their token length and
each group is cut into batches. A row stops at <|endoftext|>; its response is the text of the new
tokens up to the first <|endoftext|> (the prompt, which ends with the response header, is cut off),
stripped of surrounding whitespace. The output mirrors rasbt's instruction-data-with-response.json.
"""
import sys
import time

import numpy as np

from .data import build_prompt
from .generation import generate
from .progress import format_duration
from .tokenizer import encode


def prompt_ids(tokenizer, entry, style):
    """The token ids the model is given: prompt + response header."""
    return encode(tokenizer, build_prompt(entry, style))


def decode_response(tokenizer, new_ids):
    """Text of generated ids up to (not including) the first <|endoftext|>, stripped."""
    new_ids = list(new_ids)
    if tokenizer.eot_token in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eot_token)]
    return tokenizer.decode(new_ids).strip()


def generate_responses(model, tokenizer, entries, style, max_new_tokens, batch_size=8, progress=True):
    """Greedy responses (strings) to `entries`, in their order; a progress line on stderr if `progress`."""
    prompts = [prompt_ids(tokenizer, entry, style) for entry in entries]
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    batches = [group[start:start + batch_size] for _, group in sorted(by_length.items())
               for start in range(0, len(group), batch_size)]
    responses = [None] * len(entries)
    was_training = model.training
    model.eval()  # no dropout while generating
    start = last_print = time.monotonic()
    try:
        for batch in batches:
            idx = np.array([prompts[i] for i in batch], dtype=np.int64)                  # (B, T)
            out = generate(model, idx, max_new_tokens, eos_id=tokenizer.eot_token)        # (B, T + new)
            for i, new_ids in zip(batch, out[:, idx.shape[1]:]):
                responses[i] = decode_response(tokenizer, new_ids)
            now = time.monotonic()
            if progress and (now - last_print > 0.5 or batch is batches[-1]):  # ~2 updates a second
                last_print = now
                _print_progress(sum(r is not None for r in responses), len(entries), time.monotonic() - start)
    finally:
        model.train(was_training)
    if progress and entries:
        print(file=sys.stderr)
    return responses


def with_responses(entries, responses):
    """Copies of the entries with "model_response" added, as in instruction-data-with-response.json."""
    return [dict(entry, model_response=response) for entry, response in zip(entries, responses, strict=True)]


def _print_progress(done, total, elapsed):
    rate = done / max(elapsed, 1e-9)
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    print(f"\rtest responses: {done}/{total} ({100 * done / total:.0f}%), {rate:.1f}/s, ETA {eta}",
          end="", file=sys.stderr, flush=True)
