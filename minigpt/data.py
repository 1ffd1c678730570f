"""Instruction data: load and validate, split, tokenize once, collate into batches.

Follows rasbt's LLMs-from-scratch ch. 7. An entry is an Alpaca entry {"instruction", "input", "output"}
or a conversation {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}; both are
conversations (prompts.conversation_of), rendered by the prompt template into segments of text that are
learned (the replies and what ends them) or not (minigpt.prompts), tokenized once. A batch of B token
lists is padded with <|endoftext|> and shifted by one into inputs and targets, both (B, T) int64:

    seq       5 6                       (one example, length 2; batch longest = 5 -> T = 5)
    padded    5 6 E E E E               (one <|endoftext|> appended, then padded to longest + 1)
    inputs    5 6 E E E                 padded[:-1]
    targets   6 E I I I                 padded[1:]; pads after the first E -> I = IGNORE_INDEX

The first E stays a target so the model learns to stop. With prompt masking, a target is kept only where
its token is learned, so the loss is taken on the replies alone: the system and user text and every role
header are I. minigpt.loader draws the batches.
"""
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files.fileio import download_file, parse_json
from .losses import IGNORE_INDEX
from .prompts import (ROLES, check_template_holds, conversation_of, end_of_text_learned, render, reply_end,
                      response_header)
from .tokenizer import EOT, GPT2_EOT_ID, encode  # GPT2_EOT_ID: the default padding token

REFERENCE_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                      "ch07/01_main-chapter-code/instruction-data.json")
INSTRUCTION_KEYS = ("instruction", "input", "output")


# ---------------------------------------------------------------------------------------------
# Loading and validation

def load_json_entries(path, keys, what="data"):
    """Read a JSON list of objects whose `keys` are all strings; errors name the entry and problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    text = path.read_bytes()
    try:
        entries = parse_json(text, path)
    except ValueError as e:
        if text.lstrip().startswith(b"{"):  # one object, or one per line: the entries need a list
            raise ValueError(f"{e} (expected one JSON list of entries, [{{...}}, {{...}}]; JSON Lines, "
                             f"one object per line, is not supported)") from None
        raise
    validate_entries(entries, keys, source=str(path))
    return entries


def validate_entries(entries, keys, source="data"):
    """Check `entries` is a non-empty list of objects whose `keys` all hold strings."""
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a JSON list of entries, got {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{source}: the list of entries is empty")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is not an object but {type(entry).__name__}")
        check_keys(entry, keys, f"{source}: entry {i}")


def check_keys(entry, keys, where):
    """Raise ValueError, starting with `where`, unless each of `keys` holds a string in the object `entry`."""
    for key in keys:
        if key not in entry:
            raise ValueError(f"{where} is missing the key {key!r}")
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(entry[key]).__name__}")


def refuse_end_of_text(entries, keys, source="data"):
    """Refuse an entry whose text under `keys` holds a literal "<|endoftext|>", naming the entry; the
    tokenizer would refuse it too (tokenizer.encode), but only once training or generation meets it."""
    for i, entry in enumerate(entries):
        for key in keys:
            refuse_markers(entry[key], f"{source}: entry {i}: {key!r}")


def refuse_markers(text, where, style=None):
    """Raise ValueError, starting with `where`, when `text` holds a literal "<|endoftext|>" or the end
    marker of `style`'s template ("<|end|>" with chat). Read as text, a marker would teach the model to
    write it inside a reply, and a reply holding the end marker would be cut there when answered."""
    if EOT in text:
        raise ValueError(f"{where} holds the literal text {EOT!r} (GPT-2's end-of-text token), which "
                         f"minigpt refuses in text; remove it")
    end = reply_end(style) if style is not None else ""
    if end and end in text:
        raise ValueError(f"{where} holds the literal text {end!r}, the {style} template's end of a turn, "
                         f"which would end the turn there; remove it")


class ConversationError(ValueError):
    """A conversation no template can train on or answer; `turn` is the index of the message at fault
    (None when it is the conversation as a whole), for callers that point at it (the chat API)."""

    def __init__(self, message, turn=None):
        super().__init__(message)
        self.turn = turn


def check_conversation(messages, style=None, ends_with="assistant", where="conversation"):
    """Raise ConversationError (a ValueError), starting with `where` and the turn (the index in `messages`),
    at the first thing that makes `messages` no conversation `style`'s template can train on or answer: not
    a list of objects {"role", "content"} (other keys are kept, unread); a role not in ROLES; content that
    is not a non-empty string, or holds "<|endoftext|>" or the template's end marker (refuse_markers); a
    system message anywhere but first; user and assistant messages that do not take turns, the user's
    first; a last message not from `ends_with` ("assistant" for training and test data, "user" for a
    conversation awaiting its reply); and with alpaca or phi3, more than one exchange
    (prompts.check_template_holds)."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} '
                                f'objects')
    due = "user"
    for turn, message in enumerate(messages):
        try:
            _check_message(message, turn, style, f"{where}, turn {turn}", due)
        except ValueError as e:
            raise ConversationError(str(e), turn) from None
        if message["role"] != "system":
            due = "assistant" if message["role"] == "user" else "user"
    if messages[-1]["role"] != ends_with:
        last = ("the assistant's reply to learn" if ends_with == "assistant"
                else "the user's message to answer")
        raise ConversationError(f"{where}: the last message must be {last}, not a {messages[-1]['role']} "
                                f"message")
    if style is not None:
        try:
            check_template_holds(messages, style)
        except ValueError as e:
            raise ConversationError(f"{where}: {e}") from None


def _check_message(message, turn, style, at, due):
    """check_conversation's checks of one message, which should come from `due` unless it is a system one."""
    if not isinstance(message, dict):
        raise ValueError(f'{at}: expected an object {{"role", "content"}}, got {type(message).__name__}')
    check_keys(message, ("role", "content"), at)
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"{at}: unknown role {role!r}; choose one of: {', '.join(ROLES)}")
    if not message["content"].strip():
        raise ValueError(f"{at}: the {role} message's content is empty")
    refuse_markers(message["content"], f"{at}: the {role} message", style)
    if role == "system" and turn > 0:
        raise ValueError(f"{at}: a system message may only come first")
    if role != "system" and role != due:
        raise ValueError(f"{at}: a second {role} message in a row; user and assistant messages take turns, "
                         f"the user's first")


def load_instruction_data(path, style=None):
    """The entries of an instruction-data JSON file: Alpaca entries {"instruction", "input", "output"} and
    conversations {"messages": [...]} (check_conversation), in any mix; with `style`, each checked against
    that template too (its end marker, one exchange for alpaca and phi3). An error names the entry or
    conversation by its index in the list, and the turn."""
    entries = load_json_entries(path, (), what="instruction data")
    for i, entry in enumerate(entries):
        if "messages" in entry:
            check_conversation(entry["messages"], style, where=f"{path}: conversation {i}")
            continue
        check_keys(entry, INSTRUCTION_KEYS, f"{path}: entry {i}")
        for key in INSTRUCTION_KEYS:
            refuse_markers(entry[key], f"{path}: entry {i}: {key!r}", style)
    return entries


def expected_reply(entry):
    """The reply a test entry expects: an Alpaca entry's output, a conversation's last (assistant) message."""
    return entry["messages"][-1]["content"] if "messages" in entry else entry["output"]


def download_instruction_data(directory="data"):
    """Path of rasbt's 1,100-entry instruction dataset in `directory`, downloaded on first use."""
    path = Path(directory) / "instruction-data.json"
    if not path.is_file():
        download_file(REFERENCE_DATA_URL, path,
                      hint="Pass --data PATH to use a local copy of instruction-data.json instead.")
    return path


# ---------------------------------------------------------------------------------------------
# Splitting and the dataset

def split_data(entries, train_frac=0.85, test_frac=0.10, shuffle_seed=None):
    """(train, val, test), cut as the reference cuts them: train is the first int(n*train_frac)
    entries, test the next int(n*test_frac), val the rest (1,100 -> 935 train / 55 val / 110 test:
    85% / 5% / 10%). With `shuffle_seed`, a shuffled copy is split."""
    if not (0 <= train_frac and 0 <= test_frac and train_frac + test_frac <= 1):
        raise ValueError(f"split fractions must be >= 0 and sum to <= 1, got train {train_frac}, "
                         f"test {test_frac}")
    entries = list(entries)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    n_train = int(len(entries) * train_frac)
    n_test = int(len(entries) * test_frac)
    train, test, val = entries[:n_train], entries[n_train:n_train + n_test], entries[n_train + n_test:]
    return train, val, test


def data_fingerprint(train, val, test):
    """{"train", "val", "test": sha256 (hex) of that split's entries as canonical JSON}: it changes with
    any text of any entry, their order, or where the splits are cut (seed, sizes, file), and not with
    how a JSON file is formatted. A checkpoint records it, and --resume refuses other data."""
    return {name: hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
            for name, entries in (("train", train), ("val", val), ("test", test))}


def check_same_data(recorded, current, source):
    """Raise ValueError when `current` (data_fingerprint) differs from the fingerprint `recorded` in
    `source`, naming the split and both fingerprints. A checkpoint older than fingerprints (None) passes."""
    for split, what in (("train", "training"), ("val", "validation"), ("test", "test")):
        if recorded is not None and recorded.get(split) != current[split]:
            raise ValueError(f"data changed since the run started: fingerprint "
                             f"{str(recorded.get(split))[:12]}… in the checkpoint, {current[split][:12]}… "
                             f"now, of the {what} entries ({source}); resume with the data the run started "
                             f"with, or start a new run")


class InstructionDataset:
    """Entries (Alpaca entries and conversations alike: prompts.conversation_of) tokenized once, and batched
    as the run's loss needs them.

    token_ids[i]       the conversation's text as token ids (an Alpaca entry's: prompt + response header +
                       output). Each segment of prompts.render is encoded on its own and the pieces are
                       concatenated, so a prompt's tokens are exactly those the model gets when it answers,
                       and the masks are exact even where BPE could merge across a boundary
    learned[i]         (n,) bool: the tokens of the replies and what ends them (the targets with mask_prompt)
    prompt_lengths[i]  the tokens before the first learned one (an Alpaca entry's prompt + response header)
    dropped_turns[i]   exchanges (a user message and its reply) left out of a conversation longer than
                       allowed_max_length, oldest first and always whole; the last one is always kept
    batch(indices)     the Batch of those examples: padded with <|endoftext|>, shifted, cut to
                       allowed_max_length and, with mask_prompt, every target that is not learned ignored
    """

    def __init__(self, entries, tokenizer, style="alpaca", mask_prompt=False, allowed_max_length=None):
        self.entries = entries
        self.style = style
        self.mask_prompt = mask_prompt
        self.allowed_max_length = allowed_max_length
        self.pad_token_id = tokenizer.eot_token
        # with mask_prompt: the <|endoftext|> the collate appends ends the reply with alpaca and phi3
        self.end_learned = end_of_text_learned(style)
        self.token_ids, self.learned, self.prompt_lengths, self.dropped_turns = [], [], [], []
        for entry in entries:
            ids, learned, dropped = tokenize_conversation(conversation_of(entry), tokenizer, style,
                                                          allowed_max_length)
            self.token_ids.append(ids)
            self.learned.append(learned)
            self.prompt_lengths.append(int(learned.argmax()) if learned.any() else len(ids))
            self.dropped_turns.append(dropped)

    def __len__(self):
        return len(self.token_ids)

    def __getitem__(self, i):
        return self.token_ids[i]

    def batch(self, indices):
        """The Batch of the examples at `indices`: inputs and targets (B, T)."""
        learned = [self.learned[i] for i in indices] if self.mask_prompt else None
        return Batch(*collate([self.token_ids[i] for i in indices], pad_token_id=self.pad_token_id,
                              allowed_max_length=self.allowed_max_length, learned=learned,
                              end_learned=self.end_learned))


def reply_prompt_ids(tokenizer, messages, style):
    """Token ids of prompts.reply_prompt(messages, style), the conversation so far and the reply's header,
    each segment of the text tokenized on its own, as tokenize_conversation does for training: the model
    is given exactly the tokens it learned from."""
    *history, newest = render(messages, style)                 # newest: the last user turn, not learned
    return [i for segment in history for i in encode(tokenizer, segment.text)] + encode(
        tokenizer, newest.text + response_header(style))


def tokenize_conversation(messages, tokenizer, style, max_length=None):
    """(token ids, learned (n,) bool, exchanges dropped) of a conversation rendered in `style`. Longer than
    `max_length` tokens, it loses its oldest whole exchanges (a user message and its reply; a system
    message stays) until it fits or one exchange is left, which the collate then cuts at the end."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    starts = [i for i, message in enumerate(messages) if message["role"] == "user"]   # each exchange's start
    for dropped, start in enumerate(starts):
        ids, learned = [], []
        for segment in render(system + messages[start:], style):
            segment_ids = encode(tokenizer, segment.text)
            ids += segment_ids
            learned += [segment.learned] * len(segment_ids)
        if max_length is None or len(ids) <= max_length:
            break
    return ids, np.array(learned, dtype=bool), dropped


class Batch(NamedTuple):
    """B examples padded together, as the loss takes them (see collate)."""
    inputs: np.ndarray    # (B, T) int64 token ids
    targets: np.ndarray   # (B, T) int64, IGNORE_INDEX where the loss skips a position


# ---------------------------------------------------------------------------------------------
# Collate, and a batch as text

def collate(batch, pad_token_id=GPT2_EOT_ID, ignore_index=IGNORE_INDEX, allowed_max_length=None,
            prompt_lengths=None, learned=None, end_learned=True):
    """Pad, shift and mask B token lists into (inputs, targets), both int64 (B, T).

    T = longest + 1 (each sequence gets one <|endoftext|>), cut to `allowed_max_length` if given.
    targets[i, t] = padded[i, t+1], except ignore_index for (1) padding after the row's first pad,
    (2) with `prompt_lengths` (B,), the first prompt_lengths[i]-1 targets, whose next token is a prompt
    token (the chapter's prompt masking, a mask of the first tokens), and (3) with `learned`, B boolean
    sequences as long as the token lists (a mask of any tokens: a conversation's replies), every target
    whose token is not learned, and the appended <|endoftext|> unless `end_learned`.
    """
    if len(batch) == 0:
        raise ValueError("collate needs at least one sequence")
    lengths = np.array([len(seq) for seq in batch])                     # (B,)
    width = int(lengths.max()) + 1                                      # T + 1 before the shift
    padded = np.full((len(batch), width), pad_token_id, dtype=np.int64)  # (B, T+1)
    is_token = np.arange(width) < lengths[:, None]                      # (B, T+1), True on real tokens
    padded[is_token] = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in batch])  # row-major
    inputs = padded[:, :-1]                                             # (B, T)
    targets = padded[:, 1:].copy()                                      # (B, T)
    position = np.arange(width - 1)                                     # (T,) target position t
    # targets[i, t] is padded[i, t+1]: the first pad is at t = lengths[i]-1 and stays; mask the rest
    targets[position >= lengths[:, None]] = ignore_index
    if prompt_lengths is not None:
        prompt_lengths = np.asarray(prompt_lengths)                     # (B,)
        if prompt_lengths.shape != (len(batch),):
            raise ValueError(f"prompt_lengths has shape {prompt_lengths.shape}, expected ({len(batch)},)")
        targets[position < prompt_lengths[:, None] - 1] = ignore_index
    if learned is not None:
        if [len(mask) for mask in learned] != lengths.tolist():
            raise ValueError("learned needs one mask per sequence, as long as the sequence")
        is_learned = np.zeros((len(batch), width), dtype=bool)          # (B, T+1), as padded
        is_learned[is_token] = np.concatenate([np.asarray(mask, dtype=bool) for mask in learned])
        is_learned[np.arange(len(batch)), lengths] = end_learned        # the appended <|endoftext|>
        targets[~is_learned[:, 1:]] = ignore_index
    if allowed_max_length is not None:
        inputs = inputs[:, :allowed_max_length]
        targets = targets[:, :allowed_max_length]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def format_batch(inputs, targets, tokenizer, rows=4, ignore_index=IGNORE_INDEX):
    """A batch as the model sees it, as text: for each of the first `rows` rows the decoded input,
    then one line per position t: the input token, and the target the loss compares the prediction
    at t with, or ignore_index where the loss skips it (padding after the first <|endoftext|>, and
    with prompt masking the prompt: in a conversation, everything but the replies and their ends).
    A line "learned:" first gives the text of the targets kept, one piece per run of them (with
    masking, one per reply). Tokens are shown as id and repr'd text, so "\n" is visible."""
    shown = range(min(rows, len(inputs)))
    digits = max(len(str(ignore_index)), len(str(tokenizer.n_vocab - 1)))  # ids right-aligned
    input_cells = [[f"{x:>{digits}} {token_text(tokenizer, x)}" for x in inputs[i]] for i in shown]
    width = max(len(cell) for row in input_cells for cell in row)
    lines = []
    for i in shown:
        ids = inputs[i].tolist()
        end = len(ids)
        while end and ids[end - 1] == tokenizer.eot_token:  # the padding, summed up in the text line
            end -= 1
        padding = f" + {len(ids) - end} x {EOT!r}" if end < len(ids) else ""
        lines.append(f"row {i + 1} of {len(inputs)}, input text: {tokenizer.decode(ids[:end])!r}{padding}")
        lines.append(f"  learned: {' '.join(repr(tokenizer.decode(run)) for run in kept_runs(targets[i]))}")
        lines.append(f"  {'pos':>4}  {'input':<{width}}  target")
        for t, (cell, y) in enumerate(zip(input_cells[i], targets[i])):
            target = f"{y:>{digits}}" + ("" if y == ignore_index else f" {token_text(tokenizer, y)}")
            lines.append(f"  {t:>4}  {cell:<{width}}  {target}")
    return "\n".join(lines)


def kept_runs(targets, ignore_index=IGNORE_INDEX):
    """The runs of consecutive kept targets of one row (T,), as lists of ids."""
    runs, run = [], []
    for y in targets.tolist() + [ignore_index]:
        if y != ignore_index:
            run.append(y)
        elif run:
            runs.append(run)
            run = []
    return runs


def token_text(tokenizer, token_id):
    """One token's text, repr'd ('\\n', ' the'); bytes that are not whole UTF-8 characters as b'...'."""
    raw = tokenizer.decode_single_token_bytes(int(token_id))
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def check_responses_fit(dataset, what="training", log=print):
    """Say how many conversations of an InstructionDataset lost their oldest exchanges to the dataset's cut
    (allowed_max_length), and count the examples whose whole response is cut off: everything before their
    first reply is longer than the cut, so not even the reply's first token is a target. Some: a warning
    line through `log`. More than half: ValueError, since the run would mostly train (or validate) on
    nothing; the context is too short for the prompts."""
    cut = dataset.allowed_max_length
    if cut is None:
        return
    dropped = np.asarray(dataset.dropped_turns)                                # (N,)
    if dropped.any():
        log(f"{int((dropped > 0).sum())} of {len(dropped)} {what} conversations are longer than the cut at "
            f"{cut} tokens: their {int(dropped.sum())} oldest exchanges are left out, each whole")
    prompt_lengths = np.asarray(dataset.prompt_lengths)                        # (N,)
    lost, n = int((prompt_lengths > cut).sum()), len(prompt_lengths)
    if lost == 0:
        return
    teach = "nothing" if dataset.mask_prompt else "only their prompt"
    message = (f"{lost} of {n} {what} examples lose their whole response to the cut at {cut} tokens (their "
               f"prompt alone is longer), so they teach {teach}")
    if 2 * lost > n:
        raise ValueError(f"{message}: more than half; use a longer context (--context-length of a new model, "
                         f"--allowed-max-length) or shorter prompts")
    log(f"warning: {message}")
