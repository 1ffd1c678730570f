"""A reply's text as it is generated: token ids -> printable pieces, cut at the reply's end.

Token ids become text one at a time (`TextStream`: a character whose bytes span several tokens is held
back until it is whole). A reply ends at <|endoftext|> (a token id) or at a stop text, such as the chat
template's end marker "<|end|>", which the model writes as several tokens: `StopText` holds back any
text that may be the start of one, so a stop text is never shown, not even in part.
"""
import codecs


class TextStream:
    """Token ids -> text, incrementally: bytes of a character split across tokens are held back
    until the character is complete, so the printed pieces join up to exactly tokenizer.decode(ids)
    (invalid UTF-8 becomes U+FFFD, as in tiktoken's decode)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id):
        """The text that became printable with this token (maybe "")."""
        return self.decoder.decode(self.tokenizer.decode_single_token_bytes(int(token_id)))

    def finish(self):
        """The rest: held-back bytes of an unfinished character, as U+FFFD."""
        return self.decoder.decode(b"", final=True)


class StopText:
    """Text -> the part of it before the first stop text; what may be the start of one is held back."""

    def __init__(self, stops):
        self.stops = [stop for stop in stops if stop]
        self.held = ""
        self.stopped = False

    def feed(self, piece):
        """The text that is sure to come before any stop text (maybe ""); sets `stopped` at the first."""
        text = self.held + piece
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        keep = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])),
                   default=0)                                  # the longest end of text that may begin a stop
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self):
        """The text held back when the reply ends without a stop text: it was no stop after all."""
        held, self.held = self.held, ""
        return held


class ReplyText:
    """The reply written by a stream of token ids: `pieces(tokens)` yields its text as it becomes sure.

    ids: every token taken from the stream (a stop text's tokens included, <|endoftext|> not);
    text: the reply shown so far; finish_reason: "stop" (<|endoftext|> or a stop text), "length" (the
    stream ran out), or None while it goes on or when it was stopped from outside.
    """

    def __init__(self, tokenizer, stops=()):
        self.tokenizer = tokenizer
        self.decoded, self.stop = TextStream(tokenizer), StopText(stops)
        self.ids, self.text, self.finish_reason = [], "", None

    def pieces(self, tokens):
        for token in tokens:
            if token == self.tokenizer.eot_token:
                self.finish_reason = "stop"
                break
            self.ids.append(token)
            piece = self.stop.feed(self.decoded.feed(token))
            yield from self._shown(piece)
            if self.stop.stopped:
                self.finish_reason = "stop"
                return
        else:
            self.finish_reason = "length"
        yield from self._shown(self.stop.feed(self.decoded.finish()) + self.stop.finish())

    def _shown(self, piece):
        if piece:
            self.text += piece
            yield piece
