"""Tokenizers: GPT-2's byte-level BPE (through tiktoken) and a plain byte tokenizer.

Both are `tiktoken.Encoding`s, so callers use one interface: `encode(tokenizer, text)` -> list of ids,
`tokenizer.decode(ids)` -> text, `tokenizer.n_vocab`, `tokenizer.eot_token`.

- "gpt2":  50,257 tokens: 50,000 BPE merges over the 256 bytes, plus <|endoftext|> = 50256.
           Needed to fine-tune the pretrained GPT-2 weights, whose embedding rows are these ids.
           Built offline from OpenAI's `encoder.json` + `vocab.bpe` when a folder holding them is
           given (argument or MINIGPT_GPT2_VOCAB_DIR); otherwise tiktoken downloads them once.
- "byte":  257 tokens: byte b is token b (0..255), <|endoftext|> = 256. For small models trained
           from scratch: a tiny embedding table, and any UTF-8 text round-trips exactly.
"""
import functools
import hashlib
import os
from pathlib import Path

import tiktoken
import tiktoken.load

EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256                          # <|endoftext|> in GPT-2's vocabulary (its bos, eos and padding)
VOCAB_SIZES = {"gpt2": 50257, "byte": 257}   # tokens of each tokenizer; a model's vocab_size must match
TOKENIZERS = tuple(VOCAB_SIZES)
VOCAB_DIR_ENV = "MINIGPT_GPT2_VOCAB_DIR"

# GPT-2's pre-tokenizer (tiktoken's r50k pattern): BPE merges never cross these pieces, which are
# contractions, letters, digits, other symbols (each optionally led by one space) and whitespace.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# sha256 of OpenAI's files (the hashes tiktoken pins for "gpt2"): a local copy must be byte-identical,
# otherwise its ids would silently disagree with the pretrained embedding rows.
_GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_GPT2_FILES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def gpt2_tokenizer(vocab_dir=None):
    """GPT-2's tokenizer, identical to `tiktoken.get_encoding("gpt2")`.

    With `vocab_dir` (or the MINIGPT_GPT2_VOCAB_DIR environment variable) it is built offline from
    that folder's `encoder.json` and `vocab.bpe`; otherwise tiktoken downloads (and caches) them.
    """
    vocab_dir = vocab_dir or os.environ.get(VOCAB_DIR_ENV) or None
    if vocab_dir is not None:
        return _gpt2_from_files(str(Path(vocab_dir).resolve()))
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # requests' network errors are OSErrors; ValueError: bad hash
        raise ConnectionError(
            f"cannot download GPT-2's tokenizer files ({type(e).__name__}: {e}); set {VOCAB_DIR_ENV} "
            f"to a folder with encoder.json and vocab.bpe (from {_GPT2_FILES_URL})") from None


@functools.lru_cache(maxsize=4)  # building the 50k merge table takes ~0.3 s; callers may ask often
def _gpt2_from_files(vocab_dir):
    folder = Path(vocab_dir)
    paths = {name: folder / name for name in _GPT2_FILE_SHA256}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing GPT-2 tokenizer file(s) {', '.join(missing)} "
                                f"(download them from {_GPT2_FILES_URL})")
    for name, path in paths.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != _GPT2_FILE_SHA256[name]:
            raise ValueError(f"{path}: not OpenAI's GPT-2 {name} (sha256 {digest[:12]}..., expected "
                             f"{_GPT2_FILE_SHA256[name][:12]}...); download it again from "
                             f"{_GPT2_FILES_URL}{name}")
    mergeable_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(paths["vocab.bpe"]), encoder_json_file=str(paths["encoder.json"]),
        vocab_bpe_hash=_GPT2_FILE_SHA256["vocab.bpe"],  # makes tiktoken's file cache safe to reuse
        encoder_json_hash=_GPT2_FILE_SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=mergeable_ranks,
                             special_tokens={EOT: GPT2_EOT_ID}, explicit_n_vocab=VOCAB_SIZES["gpt2"])


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """One token per UTF-8 byte (ids 0..255) plus <|endoftext|> = 256; vocabulary 257.

    With no merges, BPE leaves every byte of every piece as its own token, so the split pattern
    only needs to cover all text (GPT-2's does); encode(text) == list(text.encode("utf-8")).
    """
    return tiktoken.Encoding(name="byte", pat_str=GPT2_SPLIT_PATTERN,
                             mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={EOT: 256}, explicit_n_vocab=VOCAB_SIZES["byte"])


def get_tokenizer(name, vocab_dir=None):
    """The tokenizer called `name` ("gpt2" or "byte"); `vocab_dir` is only used by "gpt2"."""
    if name == "gpt2":
        return gpt2_tokenizer(vocab_dir)
    if name == "byte":
        return byte_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")


def tokenizer_for(vocab_size, name=None, vocab_dir=None):
    """The tokenizer `name`, else the one whose vocabulary has `vocab_size` tokens (a model's): either way
    its ids must be the model's embedding rows, one for one. Checked against the known sizes before a
    tokenizer is built, so a mismatch never waits for a download."""
    name = name or {size: known for known, size in VOCAB_SIZES.items()}.get(vocab_size)
    if name is None:
        raise ValueError(f"the model's vocabulary has {vocab_size} tokens, which matches no tokenizer "
                         f"(gpt2 has {VOCAB_SIZES['gpt2']}, byte {VOCAB_SIZES['byte']})")
    if VOCAB_SIZES[name] != vocab_size:
        raise ValueError(f"tokenizer {name} has {VOCAB_SIZES[name]} tokens but the model's vocabulary has "
                         f"{vocab_size}; choose another --tokenizer")
    return get_tokenizer(name, vocab_dir)


def encode(tokenizer, text):
    """Token ids of `text`; a literal "<|endoftext|>" in it is refused (ValueError), as the reference's
    tiktoken default refuses it. Read as the end-of-text token it would end a training text in the
    middle; read as plain text it would teach the model to write it. The end-of-text token is added by
    id (tokenizer.eot_token), where a text really ends."""
    if EOT in text:
        raise ValueError(f"the text holds the literal text {EOT!r} (GPT-2's end-of-text token), which "
                         f"minigpt refuses in text; remove it")
    return tokenizer.encode(text, disallowed_special=())
