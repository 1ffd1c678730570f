"""A reply's text as it streams: whole characters only, and a stop text (the chat template's end marker)
never shown, not even in part, wherever the token boundaries fall."""
from pathlib import Path

import numpy as np
import pytest

from minigpt.chat.stream import ReplyText, StopText, TextStream
from minigpt.tokenizer import encode, get_tokenizer

GPT2_VOCAB_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
needs_vocab = pytest.mark.skipif(not (GPT2_VOCAB_DIR / "vocab.bpe").is_file(),
                                 reason=f"GPT-2 tokenizer files not found in {GPT2_VOCAB_DIR}")
END = "<|end|>"


def random_pieces(text, rng):
    """`text` cut at random places into pieces (some empty)."""
    cuts = np.sort(rng.integers(0, len(text) + 1, size=rng.integers(0, 8)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_text_stream_joins_to_the_full_decode_even_for_invalid_utf8():
    tokenizer = get_tokenizer("byte")
    rng = np.random.default_rng(0)
    for _ in range(200):
        some_bytes = [0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0xFF, 0x80]  # pieces of é, €, 🤖
        ids = rng.choice(some_bytes, size=rng.integers(1, 9))
        stream = TextStream(tokenizer)
        assert "".join(stream.feed(i) for i in ids) + stream.finish() == tokenizer.decode(ids.tolist())


@needs_vocab
def test_text_stream_with_gpt2_tokens_that_split_an_emoji():
    tokenizer = get_tokenizer("gpt2", GPT2_VOCAB_DIR)
    ids = encode(tokenizer, "robot 🤖 café")
    assert len(ids) > len("robot 🤖 café".split())  # the emoji takes several byte-level tokens
    stream = TextStream(tokenizer)
    pieces = [stream.feed(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "robot 🤖 café" and "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("text, shown, stopped", [
    ("The answer: fbxq<|end|>\n<|user|>", "The answer: fbxq", True),    # the marker, then what follows
    ("a <|en <|e|> <|end", "a <|en <|e|> <|end", False),                 # near misses, and a start at the end
    ("<|end|>", "", True),
    ("x < y and z|>", "x < y and z|>", False),
])
def test_a_stop_text_is_never_shown_wherever_the_pieces_are_cut(text, shown, stopped):
    rng = np.random.default_rng(1)
    for _ in range(300):
        stop = StopText([END])
        out = []
        for piece in random_pieces(text, rng):
            out.append(stop.feed(piece))
            assert shown.startswith("".join(out))   # never a character too many, not even for a while
            if stop.stopped:
                break
        out.append("" if stop.stopped else stop.finish())
        assert ("".join(out), stop.stopped) == (shown, stopped)


def test_held_back_text_is_only_what_may_start_a_stop():
    stop = StopText([END, "###"])
    assert stop.feed("Hello <") == "Hello "        # "<" may begin "<|end|>"
    assert stop.feed("|x") == "<|x"                # it did not
    assert stop.feed(" ##") == " "                 # "##" may begin "###"
    assert stop.feed("#!") == "" and stop.stopped  # the earliest stop ends the text
    assert StopText([]).feed("<|end|>") == "<|end|>"


def test_a_reply_ends_at_the_marker_at_endoftext_or_when_the_tokens_run_out():
    tokenizer = get_tokenizer("byte")
    reply = ReplyText(tokenizer, [END])
    ids = encode(tokenizer, "Hi é!<|end|>junk")
    pieces = list(reply.pieces(iter(ids)))
    assert "".join(pieces) == reply.text == "Hi é!" and reply.finish_reason == "stop"
    assert reply.ids == encode(tokenizer, "Hi é!<|end|>")       # the marker's tokens, and nothing after

    reply = ReplyText(tokenizer, [END])
    assert "".join(reply.pieces(iter(encode(tokenizer, "ok") + [tokenizer.eot_token, 65]))) == "ok"
    assert reply.finish_reason == "stop" and reply.ids == encode(tokenizer, "ok")   # <|endoftext|> not kept

    reply = ReplyText(tokenizer, [END])
    assert "".join(reply.pieces(iter(encode(tokenizer, "cut <|en")))) == "cut <|en"  # no marker after all
    assert reply.finish_reason == "length"
