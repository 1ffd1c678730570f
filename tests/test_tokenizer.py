"""Tokenizers: GPT-2 built offline from OpenAI's files, the byte tokenizer, and their errors."""
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import tiktoken

from minigpt import tokenizer as tok
from minigpt.tokenizer import EOT, byte_tokenizer, encode, get_tokenizer, gpt2_tokenizer, tokenizer_for

GPT2_VOCAB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2"
needs_vocab = pytest.mark.skipif(not (GPT2_VOCAB_DIR / "vocab.bpe").is_file(),
                                 reason=f"GPT-2 tokenizer files not found in {GPT2_VOCAB_DIR}")
TEXTS = ["Hello, world!", "", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n",
         "naïve café, 世界, emoji 🤖👍🏽", "it's they'll we've 12345 3.14"]


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer(GPT2_VOCAB_DIR)


@needs_vocab
def test_gpt2_known_ids(gpt2):
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == 50256
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode_single_token(EOT) == 50256
    # " world" with its leading space is one token; "world" alone is another
    assert gpt2.encode(" world") == [995] and gpt2.encode("world") == [6894]


@needs_vocab
@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(encode(gpt2, text)) == text


@needs_vocab
def test_gpt2_from_env_var_and_cached(monkeypatch):
    monkeypatch.setenv(tok.VOCAB_DIR_ENV, str(GPT2_VOCAB_DIR))
    assert get_tokenizer("gpt2") is gpt2_tokenizer(GPT2_VOCAB_DIR)  # built once per folder


@needs_vocab
def test_split_pattern_agrees_with_tiktokens(gpt2):
    # tiktoken now spells GPT-2's pattern with possessive quantifiers (faster, same pieces)
    from tiktoken_ext.openai_public import r50k_pat_str
    reference = tiktoken.Encoding(name="gpt2-tiktoken-pattern", pat_str=r50k_pat_str,
                                  mergeable_ranks=gpt2._mergeable_ranks, special_tokens={EOT: 50256})
    text = " ".join(TEXTS) + " a  b \n\nc\t \n  d   \n"
    assert encode(gpt2, text) == encode(reference, text)


def _tiktoken_has_gpt2_cached():
    """True when tiktoken.get_encoding("gpt2") would read its cache instead of the network."""
    cache_dir = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                 or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    return all(os.path.exists(os.path.join(cache_dir, hashlib.sha1((tok._GPT2_FILES_URL + name).encode())
                                           .hexdigest())) for name in ("encoder.json", "vocab.bpe"))


@needs_vocab
@pytest.mark.skipif(not _tiktoken_has_gpt2_cached(), reason="tiktoken's own gpt2 files are not cached")
def test_gpt2_matches_tiktoken(gpt2):
    reference = tiktoken.get_encoding("gpt2")
    text = " ".join(TEXTS)
    assert encode(gpt2, text) == reference.encode(text)


def test_gpt2_missing_files_named(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing GPT-2 tokenizer file\(s\) vocab.bpe"):
        gpt2_tokenizer(tmp_path)


def test_gpt2_wrong_files_named(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=r"encoder.json: not OpenAI's GPT-2 encoder.json"):
        gpt2_tokenizer(tmp_path)


def test_gpt2_download_failure_says_how_to_work_offline(monkeypatch):
    monkeypatch.delenv(tok.VOCAB_DIR_ENV, raising=False)

    def offline(name):
        raise OSError("network is unreachable")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ConnectionError, match=f"set {tok.VOCAB_DIR_ENV} to a folder with encoder.json"):
        gpt2_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_is_one_token_per_utf8_byte(text):
    byte = byte_tokenizer()
    ids = byte.encode(text, disallowed_special=())  # a literal "<|endoftext|>" here stays plain bytes
    assert ids == list(text.encode("utf-8"))
    assert byte.decode(ids) == text


def test_byte_tokenizer_vocab_and_eot():
    byte = get_tokenizer("byte")
    assert byte.n_vocab == 257 and byte.eot_token == 256
    assert byte.encode_single_token(EOT) == 256
    assert byte.decode([104, 105, 256]) == "hi" + EOT
    every_byte = bytes(range(256))
    assert byte.decode_bytes(list(every_byte)) == every_byte


def test_unknown_tokenizer_lists_choices():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'; choose one of: gpt2, byte"):
        get_tokenizer("bpe")


@pytest.mark.parametrize("name", ["byte", pytest.param("gpt2", marks=needs_vocab)])
def test_a_literal_end_of_text_in_text_is_refused(name):
    """Read as the end-of-text token it would end a text in the middle; read as plain text it would
    teach the model to write it. The reference refuses it too (tiktoken's default)."""
    tokenizer = get_tokenizer(name, GPT2_VOCAB_DIR)
    with pytest.raises(ValueError, match=r"the text holds the literal text '<\|endoftext\|>' \(GPT-2's end"):
        encode(tokenizer, "Hello<|endoftext|> again")
    assert encode(tokenizer, "Hello <|endoftext| >") == tokenizer.encode("Hello <|endoftext| >")


def test_tokenizer_for_a_model_is_the_one_of_its_vocabulary():
    assert tokenizer_for(257).name == "byte"
    with pytest.raises(ValueError, match="vocabulary has 100 tokens, which matches no tokenizer"):
        tokenizer_for(100)
    with pytest.raises(ValueError, match="tokenizer gpt2 has 50257 tokens but the model.s vocabulary has"):
        tokenizer_for(257, "gpt2")           # refused before anything is downloaded
