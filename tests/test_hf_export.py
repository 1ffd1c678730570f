"""A Hugging Face export is complete for transformers: its tokenizer gives minigpt's ids, and its chat
template renders minigpt's prompts (checked with transformers where it is installed; skipped without)."""
import json
from pathlib import Path

import pytest

from minigpt import GPTConfig, GPTModel
from minigpt.files.hf_tokenizer import bpe_merges, byte_characters, write_tokenizer_files
from minigpt.files.model_card import make_card
from minigpt.files.weights import save_hf_gpt2
from minigpt.prompts import PROMPT_STYLES, render, reply_prompt
from minigpt.tokenizer import byte_tokenizer, encode, gpt2_tokenizer

GPT2_VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2"
needs_gpt2_vocab = pytest.mark.skipif(not (GPT2_VOCAB / "vocab.bpe").is_file(), reason="GPT-2 vocab absent")
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse qxbf"},
        {"role": "assistant", "content": "fbxq"}, {"role": "user", "content": "Now uppercase it"}]
ONE_EXCHANGE = [{"role": "user", "content": "Edit the sentence.", "input": "He go home."}]
TEXTS = ["Hello world  x\n\n  y", "héllo wörld 日本語 🤖", "it's we're 12345 a1b2\ttab", "   leading spaces"]


def test_byte_characters_are_gpt2_s_printable_stand_ins():
    characters = byte_characters()
    assert len(set(characters.values())) == 256
    assert characters[ord("a")] == "a" and characters[ord(" ")] == "Ġ" and characters[ord("\n")] == "Ċ"


@needs_gpt2_vocab
def test_gpt2_s_vocab_and_merges_come_back_from_tiktoken_s_ranks_exactly(tmp_path):
    """vocab.json and merges.txt, rebuilt offline from the ranks, are OpenAI's encoder.json and vocab.bpe."""
    write_tokenizer_files(tmp_path, gpt2_tokenizer(GPT2_VOCAB), "alpaca", 1024)
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads(
        (GPT2_VOCAB / "encoder.json").read_text())
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n") == \
        (GPT2_VOCAB / "vocab.bpe").read_text(encoding="utf-8").split("\n")


def test_the_byte_tokenizer_has_no_merges_and_a_bpe_without_a_path_is_refused(tmp_path):
    write_tokenizer_files(tmp_path, byte_tokenizer(), "chat", 64)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == 257 and vocab["<|endoftext|>"] == 256 and vocab["Ġ"] == ord(" ")
    assert (tmp_path / "merges.txt").read_text() == "#version: 0.2\n"
    assert bpe_merges({b"a": 0, b"b": 1, b"ab": 2, b"abb": 3}) == [(b"a", b"b"), (b"ab", b"b")]
    with pytest.raises(ValueError, match="not one merge of two tokens of lower rank"):
        bpe_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


CASES = [("byte", style) for style in PROMPT_STYLES] + [("gpt2", "chat")]   # GPT-2's: 3 s per folder


@pytest.mark.parametrize("name, style", CASES)
def test_transformers_renders_minigpt_s_prompts_and_tokens_from_an_export(tmp_path, name, style):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2" and not (GPT2_VOCAB / "vocab.bpe").is_file():
        pytest.skip("GPT-2 vocab absent")
    tokenizer = byte_tokenizer() if name == "byte" else gpt2_tokenizer(GPT2_VOCAB)
    folder = tmp_path / name
    model = GPTModel(GPTConfig(vocab_size=tokenizer.n_vocab, context_length=32, emb_dim=8, n_heads=2,
                               n_layers=1))
    save_hf_gpt2(model, folder, make_card(name, style), tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    messages = CHAT if style == "chat" else ONE_EXCHANGE
    prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == reply_prompt(messages, style)
    answered = messages + [{"role": "assistant", "content": "OK"}]
    assert hf.apply_chat_template(answered, tokenize=False) == "".join(
        segment.text for segment in render(answered, style))
    for text in TEXTS + [prompt]:
        assert hf(text, add_special_tokens=False)["input_ids"] == encode(tokenizer, text), (name, text)
    assert hf.eos_token_id == tokenizer.eot_token and hf.decode(encode(tokenizer, TEXTS[1])) == TEXTS[1]
    if style != "chat":                                   # one exchange: a conversation is refused
        with pytest.raises(Exception, match="holds one exchange"):
            hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
