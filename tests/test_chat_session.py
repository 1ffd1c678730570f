"""A conversation with a model: each turn runs only its new tokens through the KV cache kept across turns,
and gets exactly the greedy tokens of recomputing the whole history; the oldest exchanges go when the
context fills; a reply stopped midway (Ctrl-C) keeps what was shown. The terminal chat on top of it."""
import functools

import numpy as np
import pytest

from minigpt import GPTConfig, GPTModel, generate
from minigpt.chat.session import ChatSession
from minigpt.data import reply_prompt_ids as prompt_ids
from minigpt.chat.terminal import chat
from minigpt.generation import CachedContext
from minigpt.optim import Adam
from minigpt.prompts import render, reply_prompt
from minigpt.tokenizer import byte_tokenizer, encode

TOKENIZER = byte_tokenizer()
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi again."}]


@functools.lru_cache(maxsize=1)
def chatty_model():
    """A tiny byte model that has memorized CONVERSATION in the chat template (0.7 s of Adam): its greedy
    replies are "Hello!" to "Hi", then "Hi again." to "Again", each ended by <|end|>."""
    text = "".join(segment.text for segment in render(CONVERSATION, "chat"))
    ids = np.array([encode(TOKENIZER, text)])                         # (1, 99)
    model = GPTModel(GPTConfig(vocab_size=257, context_length=128, emb_dim=32, n_heads=2, n_layers=2), seed=0)
    optimizer = Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        model.zero_grad()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
    return model


def random_model(context_length=512):
    """A random byte model whose greedy continuations vary (scaled weights: GPT-2's init repeats one byte)."""
    model = GPTModel(GPTConfig(vocab_size=257, context_length=context_length, emb_dim=32, n_heads=4,
                               n_layers=2), seed=4)
    for name, p in model.named_parameters():
        if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.data *= 6.0
    return model


def record_positions(model, monkeypatch):
    """A list that gets the number of positions of each forward pass the model runs."""
    runs, forward = [], model.forward

    def recorded(idx, *args, **kwargs):
        runs.append(np.shape(idx)[1])
        return forward(idx, *args, **kwargs)
    monkeypatch.setattr(model, "forward", recorded)
    return runs


def uncached_reply(model, ids, n):
    """The greedy tokens of recomputing everything: every step runs the whole sequence, no cache."""
    return generate(model, np.array([ids]), n, use_cache=False)[0, len(ids):].tolist()


def shared_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_each_turn_runs_only_what_the_cache_lacks_and_gets_the_tokens_of_recomputing(monkeypatch):
    model = random_model()                           # its replies run out of tokens: no end marker
    session = ChatSession(model, TOKENIZER, "chat", system="Be brief.")
    runs = record_positions(model, monkeypatch)
    last_prompt, replies = [], set()
    for message in ["Hello there", "Reverse abc", "And then?", "Again"]:
        history = list(session.ids)
        cached = session.context.ids[:session.context.cache.length]
        assert session.ask(message, max_new_tokens=12) == 0
        prompt = session.prompt
        new_turn = encode(TOKENIZER, reply_prompt(session.messages, "chat")[len(TOKENIZER.decode(history)):])
        assert prompt == history + new_turn                          # the history's tokens, then this turn's
        runs.clear()
        reply = "".join(session.reply())
        reused = shared_prefix(cached, prompt)
        assert reused >= len(last_prompt) and runs[0] == len(prompt) - reused   # never the older history
        assert runs[1:] == [1] * (len(runs) - 1)                     # then one token a step
        assert session.last.ids == uncached_reply(model, prompt, len(session.last.ids))
        assert session.messages[-1] == {"role": "assistant", "content": reply}
        last_prompt = prompt
        replies.add(tuple(session.last.ids))
    assert len(replies) > 1                                          # the replies differ: the test can fail


def test_the_memorized_chat_answers_from_the_conversation_and_runs_only_the_new_turn(monkeypatch):
    model = chatty_model()
    session = ChatSession(model, TOKENIZER, "chat")
    runs = record_positions(model, monkeypatch)
    replies = []
    for message in ("Hi", "Again"):
        history = list(session.ids)
        session.ask(message, max_new_tokens=30)
        runs.clear()
        replies.append("".join(session.reply()))
        assert session.last.finish_reason == "stop"                  # at <|end|>, which is not shown
        # the new turn and the reply's last token, which was chosen but never run: nothing else
        assert runs[0] == len(session.ids) - len(history) - len(session.last.ids) + (1 if history else 0)
    assert replies == ["Hello!", "Hi again."]
    text = reply_prompt(session.messages[:-1], "chat") + "Hi again.<|end|>"
    assert TOKENIZER.decode(session.ids) == text                     # the cache holds the template's text
    assert session.ids == (prompt_ids(TOKENIZER, CONVERSATION[:3], "chat")
                           + encode(TOKENIZER, "Hi again.<|end|>"))


def test_when_the_context_fills_the_oldest_exchanges_go_and_the_system_message_stays():
    model = random_model(context_length=96)
    session = ChatSession(model, TOKENIZER, "chat", system="S")
    dropped = []
    for i in range(8):
        dropped.append(session.ask(f"message {i}", max_new_tokens=10))
        prompt = session.prompt
        assert session.messages[0] == {"role": "system", "content": "S"}
        assert session.messages[-1] == {"role": "user", "content": f"message {i}"}
        assert len(prompt) + 10 <= 96
        if dropped[-1]:                                              # tokenized anew from the kept messages
            assert prompt == prompt_ids(TOKENIZER, session.messages, "chat")
        "".join(session.reply())
        assert session.last.ids == uncached_reply(model, prompt, len(session.last.ids))
    assert dropped[0] == 0 and sum(dropped) >= 2


def test_a_message_too_long_for_the_context_is_refused_and_nothing_changes():
    session = ChatSession(random_model(context_length=64), TOKENIZER, "chat")
    session.ask("short", max_new_tokens=8)
    "".join(session.reply())
    before = (list(session.messages), list(session.ids))
    with pytest.raises(ValueError, match="leaves no room for a reply in the context window of 64"):
        session.ask("x" * 50, max_new_tokens=8)
    with pytest.raises(ValueError, match="<|end|>"):
        session.ask("a literal <|end|> would end the turn", max_new_tokens=8)
    assert (session.messages, session.ids) == before


def test_a_reply_stopped_midway_keeps_what_was_shown_and_the_chat_goes_on(monkeypatch):
    model = random_model()
    session = ChatSession(model, TOKENIZER, "chat")
    session.ask("Tell me more", max_new_tokens=20)
    replying = session.reply()
    shown = [next(replying) for _ in range(3)]
    replying.close()                                                 # the caller stopped reading
    assert session.messages[-1] == {"role": "assistant", "content": "".join(shown)}

    calls, forward = [0], model.forward

    def interrupted(*args, **kwargs):                                # Ctrl-C in the middle of the 4th step
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)
    monkeypatch.setattr(model, "forward", interrupted)
    session.ask("Go on", max_new_tokens=20)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.reply():
            pieces.append(piece)
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)} and pieces
    monkeypatch.setattr(model, "forward", forward)
    session.ask("And?", max_new_tokens=20)                           # the cache was left consistent
    prompt = session.prompt
    "".join(session.reply())
    assert TOKENIZER.decode(prompt) == reply_prompt(session.messages[:-1], "chat")
    assert session.last.ids == uncached_reply(model, prompt, len(session.last.ids))


def test_one_exchange_templates_answer_each_message_on_its_own():
    model = random_model()
    session = ChatSession(model, TOKENIZER, "phi3")
    for message in ("Reverse abc", "Sort dcba"):
        session.ask(message, max_new_tokens=10)
        assert session.prompt == prompt_ids(TOKENIZER, [{"role": "user", "content": message}], "phi3")
        prompt = session.prompt
        "".join(session.reply())
        assert session.last.ids == uncached_reply(model, prompt, len(session.last.ids))
    with pytest.raises(ValueError, match="no system turn"):
        session.set_system("Be brief.")


def test_the_cached_context_reuses_the_longest_shared_prefix_and_recomputes_the_rest(monkeypatch):
    model = random_model()
    context = CachedContext(model)
    runs = record_positions(model, monkeypatch)
    ids = list(range(40, 70))
    first = context.next_logits(ids)
    changed = ids[:20] + [99] + ids[21:]                             # changed at 20: 20.. run again
    np.testing.assert_allclose(context.next_logits(changed), model(np.array([changed])).data[0, -1],
                               rtol=1e-4, atol=1e-5)
    first_25 = context.next_logits(ids[:25])
    np.testing.assert_allclose(context.next_logits(ids[:25]), first_25, rtol=1e-4, atol=1e-5)
    assert runs == [30, 10, 30, 5, 1]      # all; from the change on; the full forward; 20..24; the last one
    assert first.shape == first_25.shape == (257,)


# ----------------------------------------------------------------------------- the terminal chat

def run_chat(session, lines):
    """chat() on `lines`; returns (stdout, notes)."""
    lines, out, notes = iter(lines), [], []
    assert chat(session, lambda marker: next(lines, ""), out.append, notes.append, max_new_tokens=30) == 0
    return "".join(out), notes


def test_the_terminal_chat_keeps_the_conversation_resets_and_takes_a_system_message():
    out, notes = run_chat(ChatSession(chatty_model(), TOKENIZER, "chat"),
                          ["Hi\n", "Again\n", "/reset\n", "\n", "Again\n", "/system Be brief.\n", "/oops\n",
                           "Hi\n", "/quit\n", "never read\n"])
    fresh = ChatSession(chatty_model(), TOKENIZER, "chat")
    fresh.ask("Again", 30)
    alone = "".join(fresh.reply())
    assert alone != "Hi again."                                      # without the first exchange: another
    fresh.set_system("Be brief.")
    fresh.ask("Hi", 30)
    assert out == f"Hello!\nHi again.\n{alone}\n{''.join(fresh.reply())}\n"
    assert "(a new conversation)" in notes and "(a new conversation, under that system message)" in notes
    assert any("unknown command /oops" in note for note in notes)


def test_ctrl_c_stops_a_reply_in_the_terminal_and_the_chat_goes_on(monkeypatch):
    model = chatty_model()
    calls, forward = [0], model.forward

    def interrupted(*args, **kwargs):                                # Ctrl-C while the 4th token is computed
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)
    monkeypatch.setattr(model, "forward", interrupted)
    session = ChatSession(model, TOKENIZER, "chat")
    out, notes = run_chat(session, ["Hi\n", "Again\n"])
    assert "(stopped; the part shown is kept as the reply)" in notes
    assert session.messages[1] == {"role": "assistant", "content": "Hel"}
    assert out == f"Hel\n{session.messages[3]['content']}\n"
    prompt = prompt_ids(TOKENIZER, session.messages[:3], "chat")     # the reply to "Again" saw "Hel"
    monkeypatch.setattr(model, "forward", forward)
    assert session.last.ids == uncached_reply(model, prompt, len(session.last.ids))


def test_a_line_ending_in_a_backslash_goes_on_on_the_next():
    session = ChatSession(random_model(), TOKENIZER, "phi3")
    run_chat(session, ["Reverse\\\n", "qxbf\n", "last\\\n"])                # the input ends mid-message
    assert session.messages[0] == {"role": "user", "content": "last"}
    run_chat(session, ["Reverse\\\n", "qxbf\n"])
    assert session.messages[0] == {"role": "user", "content": "Reverse\nqxbf"}   # phi3's instruction + input


def test_the_terminal_chat_says_when_the_template_holds_one_exchange():
    _, notes = run_chat(ChatSession(random_model(), TOKENIZER, "alpaca"), ["/system Be brief.\n"])
    assert any("each message is answered on its own" in note for note in notes)
    assert "(the alpaca template has no system turn)" in notes
