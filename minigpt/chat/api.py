"""OpenAI's chat-completions layout: a request's checks, and the replies as JSON or server-sent events.

    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "Hi"}], "stream": true,
                                "temperature": 0.7, "top_k": 40, "max_tokens": 100, "seed": 1}

Understood: messages, stream, temperature, top_k (as vLLM and llama.cpp take it), max_tokens (or its newer
name max_completion_tokens), seed, stop (a text or up to 4), and top_p and n only at their defaults (1):
anything else would change the reply without a word. Other fields (model, user, ...) are read by no one.
A request this server cannot answer as asked gets an ApiError: a 4xx status and OpenAI's error layout,
{"error": {"message", "type", "param", "code"}}.
"""
import json
import math
import time
import uuid
from typing import NamedTuple

from ..data import ConversationError, check_conversation

MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class ChatRequest(NamedTuple):
    messages: list
    stream: bool
    max_tokens: int
    temperature: float
    top_k: int          # None: every token
    seed: int           # None: a fresh seed
    stop: list          # texts that end the reply (besides the template's end marker)


def parse_request(body, style, defaults):
    """The ChatRequest in a request's body (bytes), checked; `defaults` has the server's max_tokens,
    temperature and top_k, used where the request gives none."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the body must be a JSON object")
    check_messages(request.get("messages"), style)
    for name in ("top_p", "n"):
        if request.get(name, 1) not in (1, None):
            raise ApiError(400, f"{name} is not supported (only 1); minigpt samples with temperature and "
                                f"top_k", name)
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    return ChatRequest(
        messages=request["messages"],
        stream=_field(request, "stream", bool, False),
        max_tokens=_count(max_tokens, "max_tokens", defaults["max_tokens"], minimum=0),
        temperature=_temperature(request.get("temperature"), defaults["temperature"]),
        top_k=_count(request.get("top_k"), "top_k", defaults["top_k"], minimum=1),
        seed=_count(request.get("seed"), "seed", None, minimum=0),
        stop=_stops(request.get("stop")))


def check_messages(messages, style):
    """Refuse what the template cannot answer, as training data is refused (data.check_conversation): a role
    not in ROLES, content that is not non-empty text or holds <|endoftext|> or the end marker, a system
    message not first, user and assistant messages that do not take turns, a last message not the user's;
    with a one-exchange template (alpaca, phi3), anything but one user message. A content given as
    OpenAI's list of text parts is replaced by its text first."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, '"messages" must be a non-empty list of {"role", "content"} objects', "messages")
    for turn, message in enumerate(messages):
        if isinstance(message, dict):
            message["content"] = _text(message.get("content"), f"messages[{turn}]")
    try:
        check_conversation(messages, style, ends_with="user", where="messages")
    except ConversationError as e:
        raise ApiError(400, str(e), "messages" if e.turn is None else f"messages[{e.turn}]") from None


def _text(content, at):
    """A message's content as text: a string, or OpenAI's list of parts whose text parts are joined."""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, f"{at}: the content must be non-empty text", at)
    return content


def _field(request, name, kind, default):
    value = request.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(400, f"{name} must be {kind.__name__}, got {value!r}", name)
    return value


def _count(value, name, default, minimum):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApiError(400, f"{name} must be an integer >= {minimum}, got {value!r}", name)
    return value


def _temperature(value, default):
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ApiError(400, f"temperature must be a number >= 0, got {value!r}", "temperature")
    return float(value)


def _stops(value):
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS
            and all(isinstance(stop, str) and stop for stop in stops)):
        raise ApiError(400, f"stop must be a non-empty text or a list of up to {MAX_STOPS}", "stop")
    return stops


# ---------------------------------------------------------------------------------------------
# Replies

def new_id():
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(reply_id, model, text, finish_reason, prompt_tokens, completion_tokens):
    """A whole reply: the body of a response to a request without stream."""
    return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk(reply_id, model, delta, finish_reason=None):
    """One server-sent event of a streamed reply: its role first, then pieces of text, then the reason."""
    body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
