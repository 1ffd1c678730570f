"""Preference data for DPO: load and validate, tokenize chosen/rejected pairs, collate, and the checks.

An entry is {"instruction", "input", "output", "chosen", "rejected"} (rasbt's
instruction-data-with-preference.json: "chosen" is the preferred response, "rejected" the other); the
entries split 85/5/10 as fine-tuning's do (data.split_data). Both responses follow the same prompt,
built exactly as in fine-tuning and generation (prompts.build_prompt: prompt and response header of the
prompt style), and each ends with <|endoftext|>. A batch of B pairs is one (2B, T) array: the B chosen
sequences, then the B rejected ones, padded together so that one forward pass scores both. The targets
keep only the response and its closing <|endoftext|>:

    prompt P P P (P = 3 tokens, response header included), chosen c1 c2, rejected r1 (E = <|endoftext|>)
    chosen    inputs  P P P c1 c2           targets  I I c1 c2 E
    rejected  inputs  P P P r1 E            targets  I I r1 E  I       (I = IGNORE_INDEX)

The closing <|endoftext|> counts: a response is preferred as a whole, stopping included (the same
target the fine-tuning collate keeps, and TRL's choice). The reference notebook differs in two ways:
it masks every <|endoftext|>, the first included, so stopping is not scored; and it scores the four
tokens of the "### Response:\n" header, which are the same in both responses (measured on all 2,200
of its sequences: both score the same 32,291 response tokens, and its rows differ from ours by exactly
those five positions). Entries whose chosen and rejected responses are equal (6 of the reference's
1,100) have no preference: they add log 2 to the loss and nothing to the gradient; a run counts them
(check_pairs_differ).
"""
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .data import INSTRUCTION_KEYS, collate, load_json_entries, refuse_end_of_text
from .files.fileio import download_file
from .prompts import build_prompt
from .tokenizer import encode

PREFERENCE_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                       "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json")
PREFERENCE_KEYS = INSTRUCTION_KEYS + ("chosen", "rejected")


def load_preference_data(path):
    """The entries of a preference JSON file; one clear error naming the first bad entry."""
    entries = load_json_entries(path, PREFERENCE_KEYS, what="preference data")
    refuse_end_of_text(entries, PREFERENCE_KEYS, source=str(path))
    return entries


def download_preference_data(directory="data"):
    """Path of rasbt's 1,100-entry preference dataset in `directory`, downloaded on first use."""
    path = Path(directory) / "instruction-data-with-preference.json"
    if not path.is_file():
        download_file(PREFERENCE_DATA_URL, path,
                      hint="Pass --data PATH to use a local copy of instruction-data-with-preference.json.")
    return path


class PreferenceBatch(NamedTuple):
    """B preference pairs padded together: rows 0..B-1 are the chosen sequences, B..2B-1 the rejected."""
    inputs: np.ndarray    # (2B, T) int64 token ids
    targets: np.ndarray   # (2B, T) int64, IGNORE_INDEX on prompt and padding
    indices: np.ndarray   # (B,) positions of the pairs in their dataset
    fingerprint: str      # of the dataset, so cached reference log-probabilities can be matched to it

    @property
    def size(self):
        return len(self.indices)


def collate_preferences(chosen, rejected, prompt_lengths, pad_token_id, allowed_max_length=None):
    """Pad, shift and mask B chosen and B rejected token lists into (inputs, targets), both (2B, T).

    Each list is prompt + response; data.collate appends <|endoftext|> (= pad_token_id) and keeps it
    as a target, sets padding targets after it to IGNORE_INDEX, and masks the prompt_lengths[i]
    prompt tokens (both sequences of pair i share the prompt). T = the longest of all 2B plus one,
    cut to allowed_max_length.
    """
    if not (len(chosen) == len(rejected) == len(prompt_lengths)):
        raise ValueError(f"collate_preferences: {len(chosen)} chosen, {len(rejected)} rejected and "
                         f"{len(prompt_lengths)} prompt lengths; they must match")
    return collate(list(chosen) + list(rejected), pad_token_id=pad_token_id,
                   allowed_max_length=allowed_max_length,
                   prompt_lengths=np.concatenate([prompt_lengths, prompt_lengths]))


class PreferenceDataset:
    """Preference entries tokenized once.

    chosen[i], rejected[i]: token ids of prompt + response (the collate appends <|endoftext|>)
    prompt_lengths[i]:      tokens of the prompt, response header included; encoded on its own, as
                            in data.InstructionDataset, so it is exactly the prompt the model gets
                            at generation time
    allowed_max_length:     sequences are cut to this many input positions (the model's context)
    entries, left_out:      the entries kept, and how many were left out: those whose prompt alone is
                            longer than allowed_max_length, since none of their response would be scored
                            (as data.check_responses_fit counts them in fine-tuning; check_pairs_fit says how
                            many, and refuses when it is more than half)
    fingerprint:            a hash of all of the above, which ties reference log-probabilities to it
    """

    def __init__(self, entries, tokenizer, style="alpaca", allowed_max_length=None):
        self.style = style
        self.pad_token_id = tokenizer.eot_token
        self.allowed_max_length = allowed_max_length
        self.entries, self.chosen, self.rejected, self.prompt_lengths = [], [], [], []
        for entry in entries:
            prompt_ids = encode(tokenizer, build_prompt(entry, style))
            if allowed_max_length is not None and len(prompt_ids) > allowed_max_length:
                continue
            self.entries.append(entry)
            self.chosen.append(prompt_ids + encode(tokenizer, entry["chosen"]))
            self.rejected.append(prompt_ids + encode(tokenizer, entry["rejected"]))
            self.prompt_lengths.append(len(prompt_ids))
        self.left_out = len(entries) - len(self.entries)
        content = [self.chosen, self.rejected, self.prompt_lengths, self.pad_token_id, allowed_max_length]
        self.fingerprint = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]

    def __len__(self):
        return len(self.chosen)

    def batch(self, indices):
        """The PreferenceBatch of the pairs at `indices`."""
        indices = np.asarray(indices, dtype=np.int64)                  # (B,)
        inputs, targets = collate_preferences(
            [self.chosen[i] for i in indices], [self.rejected[i] for i in indices],
            np.asarray(self.prompt_lengths)[indices], self.pad_token_id, self.allowed_max_length)
        return PreferenceBatch(inputs, targets, indices, self.fingerprint)

    def batches(self, batch_size):
        """Every pair once, in order, in batches of batch_size (the last may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, len(self))))


def chosen_response(entry):
    """What a DPO run's test response is scored against: the pair's chosen response."""
    return entry["chosen"]


def check_pairs_fit(dataset, what="training", log=print):
    """Fine-tuning's rule for prompts that fill the context (data.check_responses_fit), for pairs: the pairs
    a PreferenceDataset left out are counted in a warning through `log`; more than half is a ValueError."""
    lost, n = dataset.left_out, dataset.left_out + len(dataset)
    if lost == 0:
        return
    message = (f"{lost} of {n} {what} pairs lose their whole responses to the cut at "
               f"{dataset.allowed_max_length} tokens (their prompt alone is longer), so they are left out")
    if 2 * lost > n:
        raise ValueError(f"{message}: more than half; use a model with a longer context, "
                         f"--allowed-max-length, or shorter prompts")
    log(f"warning: {message}")


def check_pairs_differ(entries, what="training", log=print):
    """Pairs whose chosen and rejected responses are the same text express no preference: DPO's loss is
    log 2 for them, whatever the model, and their gradient is zero. Some: a warning through `log`; all:
    a ValueError, since the run would train at a constant loss of 0.693 and learn nothing."""
    same = sum(entry["chosen"] == entry["rejected"] for entry in entries)
    if same == len(entries):
        raise ValueError(f"every one of the {len(entries)} {what} pairs has the same chosen and rejected "
                         f"response: there is no preference to learn (the loss would stay at log 2 = 0.693)")
    if same:
        log(f"warning: {same} of {len(entries)} {what} pairs have the same chosen and rejected response; "
            f"they teach nothing (their loss stays at log 2)")
