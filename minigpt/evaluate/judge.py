"""An LLM judge (rasbt ch. 7, section 7.8): a model served by a local Ollama server scores each response.

The judge is asked for a 0-100 score of a response against the expected output, greedily and seeded,
so the same responses get the same scores. Every request has one deadline, from connecting to the
reply's last byte; a reply without an integer leaves that response unscored, with a warning.
"""
import argparse
import http.client
import io
import json
import math
import re
import sys
import time
import urllib.parse

from ..data import validate_entries
from ..prompts import format_input

JUDGE_KEYS = ("instruction", "output", "model_response")
DEFAULT_OLLAMA_URL = "http://localhost:11434"
DEFAULT_JUDGE_TIMEOUT = 120.0  # seconds for one reply, from connecting to its last byte
JUDGE_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")


def positive_seconds(text):
    """argparse type: a finite number of seconds > 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


class JudgeUnavailable(Exception):
    """No usable Ollama server: its one-line message says what happened and how to fix it."""


def ask_ollama(prompt, model="llama3", url=DEFAULT_OLLAMA_URL, timeout=DEFAULT_JUDGE_TIMEOUT):
    """The reply of `model` on the Ollama server at `url` to one user message (greedy, seeded): the
    message's content as the server sent it (normally a str). `timeout` bounds the whole exchange."""
    request = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False,
               "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}  # deterministic scores
    try:
        status, body = _post_json(f"{url.rstrip('/')}/api/chat", request, timeout)
    except TimeoutError:
        raise JudgeUnavailable(f"the Ollama server at {url} sent no complete reply within {timeout:g} s; "
                               f"a model that is slow to load may need a longer --judge-timeout") from None
    except (OSError, http.client.HTTPException) as e:  # refused connection, unknown host, not HTTP
        raise JudgeUnavailable(f"no Ollama server answered at {url} ({e}); start one with "
                               f"`ollama serve` and get the model with `ollama pull {model}`") from None
    if status != 200:  # the server answered, but e.g. the model is not pulled
        detail = body.decode("utf-8", errors="replace").strip()
        raise JudgeUnavailable(f"the Ollama server at {url} refused the request (HTTP {status}: "
                               f"{detail}); try `ollama pull {model}`")
    try:
        return json.loads(body)["message"]["content"]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: absurdly nested JSON
        raise JudgeUnavailable(f"{url} did not answer like an Ollama server: {body[:80]!r}") from None


def _post_json(url, payload, timeout):
    """POST `payload` as JSON to `url` -> (HTTP status, body bytes), all within `timeout` seconds.

    A socket timeout bounds each read, not the request: a server sending a byte per second would
    hold it for as long as it likes. So one deadline bounds the connection and every read (for
    https, the TLS handshake's own reads are bounded one by one), and the reply, read until the
    server closes the connection, is parsed by http.client afterwards.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JudgeUnavailable(f"{url.removesuffix('/api/chat')!r} is not an http:// address "
                               f"(e.g. {DEFAULT_OLLAMA_URL})")
    deadline = time.monotonic() + timeout
    https = parts.scheme == "https"
    connection = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
        parts.hostname, parts.port or (443 if https else 80), timeout=timeout)
    received = bytearray()
    try:
        connection.connect()
        connection.sock.settimeout(_seconds_left(deadline))  # sendall: one bound for the whole send
        connection.request("POST", parts.path, body=json.dumps(payload).encode("utf-8"),
                           headers={"Content-Type": "application/json", "Connection": "close"})
        while True:
            connection.sock.settimeout(_seconds_left(deadline))
            chunk = connection.sock.recv(1 << 16)
            if not chunk:
                break
            received += chunk
    finally:
        connection.close()
    response = http.client.HTTPResponse(_Received(bytes(received)))
    response.begin()
    return response.status, response.read()


def _seconds_left(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _Received:
    """The one socket method http.client.HTTPResponse calls, serving bytes already received."""

    def __init__(self, data):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def parse_score(reply):
    """The first integer in the judge's reply, clamped to 0..100; None if there is none or the reply
    is not text (a number or null in the JSON: the judge did not do as asked)."""
    match = re.search(r"-?\d+", reply) if isinstance(reply, str) else None
    return None if match is None else min(100, max(0, int(match.group())))


def judge_responses(entries, model="llama3", url=DEFAULT_OLLAMA_URL, timeout=DEFAULT_JUDGE_TIMEOUT):
    """Scores 0..100 from an LLM judge: mean over the parsable replies and the per-entry scores.

    Raises JudgeUnavailable when no Ollama server answers (within `timeout` seconds per reply); a
    reply without an integer is skipped (score None) with a warning on stderr.
    """
    validate_entries(entries, JUDGE_KEYS, source="responses")
    scores = []
    for i, entry in enumerate(entries):
        prompt = JUDGE_PROMPT.format(prompt=format_input(entry), output=entry["output"],
                                     response=entry["model_response"])
        reply = ask_ollama(prompt, model=model, url=url, timeout=timeout)
        scores.append(parse_score(reply))
        if scores[-1] is None:
            shown = reply[:60] if isinstance(reply, str) else reply
            print(f"warning: judge reply for entry {i} has no score, skipped: {shown!r}", file=sys.stderr)
    valid = [s for s in scores if s is not None]
    return {"model": model, "mean_score": sum(valid) / len(valid) if valid else None,
            "scored": len(valid), "scores": scores}
