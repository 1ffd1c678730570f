"""A conversation with a model: its messages, the token ids of its text, and a KV cache kept across turns.

    session = ChatSession(model, tokenizer, "chat")
    session.ask("Reverse 'qxbf'", max_new_tokens=100)   # the user's turn: dropped oldest exchanges, if any
    for piece in session.reply():                        # the model's, streamed; kept in the conversation
        print(piece, end="")

The conversation's token ids are the model's own: a reply's tokens as generated, then the next user
turn's text tokenized and appended. So the cache (generation.CachedContext) already holds everything up
to the new turn, and a turn runs only its new tokens. When the context window would overflow, the
oldest whole exchanges (a user message and its reply) are dropped, never the system message; the
positions of every token then change, so the next turn runs the whole kept conversation once.

alpaca and phi3 hold one exchange, so with them each message is answered on its own.
"""
from ..generation import CachedContext
from ..data import reply_prompt_ids
from ..prompts import CHAT_TEMPLATES, check_style, render, reply_end, reply_prompt
from ..tokenizer import encode
from .stream import ReplyText


class ChatSession:
    """A conversation in `style`'s template: messages (the system message first, if any), ids (the token
    ids of its text), context (their keys and values), last (the latest reply's ReplyText)."""

    def __init__(self, model, tokenizer, style, system=None):
        self.tokenizer, self.style = tokenizer, check_style(style)
        self.one_exchange = style not in CHAT_TEMPLATES
        self.context = CachedContext(model)
        self.context_length = model.cfg.context_length
        self.system, self.last = None, None
        self.set_system(system)

    def set_system(self, text):
        """Start a new conversation under the system message `text` (None or "": none)."""
        if text and self.one_exchange:
            raise ValueError(f"the {self.style} template has no system turn")
        self.system = text or None
        self.reset()

    def reset(self):
        """Forget every exchange (the system message stays). The cache keeps what the next turn shares."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids = []               # token ids of the conversation's text, as given to the model
        self.prompt, self.room = None, 0

    def ask(self, text, max_new_tokens):
        """Add the user message `text`; return how many of the oldest exchanges were dropped so that the
        reply has room for max_new_tokens tokens (or a quarter of the context window, if that is less).
        A message that fills the context window alone is refused (ValueError); nothing changes."""
        end = reply_end(self.style)
        if end and end in text:
            raise ValueError(f"the message holds the literal text {end!r}, the {self.style} template's end "
                             f"of a turn, which would end it there")
        user = {"role": "user", "content": text}
        messages = [user] if self.one_exchange else self.messages + [user]
        if len(messages) > 1 and messages[-2]["role"] == "assistant":  # self.ids hold the history
            history = "".join(segment.text for segment in render(self.messages, self.style))
            prompt = self.ids + encode(self.tokenizer, reply_prompt(messages, self.style)[len(history):])
        else:
            prompt = reply_prompt_ids(self.tokenizer, messages, self.style)
        room, dropped = min(max_new_tokens, self.context_length // 4), 0
        first = 1 if self.system else 0                        # the oldest exchange after the system message
        while len(prompt) + room > self.context_length and len(messages) - first > 1:
            del messages[first:first + 2]
            prompt, dropped = reply_prompt_ids(self.tokenizer, messages, self.style), dropped + 1
        if len(prompt) >= self.context_length:
            raise ValueError(f"the message takes {len(prompt)} tokens with the template, which leaves no "
                             f"room for a reply in the context window of {self.context_length}")
        self.messages, self.prompt = messages, prompt
        self.room = min(max_new_tokens, self.context_length - len(prompt))
        return dropped

    def reply(self, temperature=0.0, top_k=None, rng=None):
        """Yield the reply to the last message, piece by piece; it ends at <|endoftext|>, the template's end
        marker (never shown) or after the tokens ask() made room for. However it ends (the caller may stop
        early, or Ctrl-C may interrupt it), the text shown so far is kept as the reply. `last` is the
        ReplyText (finish_reason, ids)."""
        if self.prompt is None:
            raise ValueError("reply() needs a user message first (ask)")
        prompt, self.prompt = self.prompt, None
        self.last = ReplyText(self.tokenizer, [reply_end(self.style)])
        tokens = self.context.generate(prompt, self.room, temperature, top_k, rng, self.tokenizer.eot_token)
        try:
            yield from self.last.pieces(tokens)
        finally:
            self._keep(prompt, self.last)

    def _keep(self, prompt, reply):
        """Add the reply to the conversation, ended by the end marker. Its tokens stay the model's own (they
        are in the cache) when they are its text and marker, or its text (then the marker is added); else
        (a marker's start or part of a character held back when it was stopped, a token that ran past the
        marker) the text and marker are tokenized anew."""
        self.messages.append({"role": "assistant", "content": reply.text})
        end, text = reply_end(self.style), self.tokenizer.decode(reply.ids)
        if text == reply.text + end:
            self.ids = prompt + reply.ids
        elif text == reply.text:
            self.ids = prompt + reply.ids + encode(self.tokenizer, end)
        else:
            self.ids = prompt + encode(self.tokenizer, reply.text + end)
