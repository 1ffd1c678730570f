"""Score model responses against the expected outputs: ROUGE-L, exact match, optional LLM judge.

    python -m minigpt.evaluate RESPONSES.json [--judge-model llama3] [--out metrics.json]

RESPONSES.json is a JSON list of entries with "output" (expected) and "model_response" (generated),
plus "instruction" and "input" for the judge. The offline scores need nothing but this file; the
judge (rasbt ch. 7, section 7.8) asks a model served by a local Ollama server for a 0-100 score.
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

from .data import format_input, load_json_entries, validate_entries
from .fileio import write_json

RESPONSE_KEYS = ("output", "model_response")
JUDGE_KEYS = ("instruction", "output", "model_response")
DEFAULT_OLLAMA_URL = "http://localhost:11434"
DEFAULT_JUDGE_TIMEOUT = 120.0  # seconds for one reply, from connecting to its last byte
JUDGE_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")


# ---------------------------------------------------------------------------------------------
# Offline scores

def words(text):
    """Lowercased word tokens: maximal runs of letters and digits ("It's 45km!" -> it, s, 45km)."""
    return re.findall(r"[^\W_]+", text.lower())


def lcs_length(a, b):
    """Length of the longest common subsequence of sequences a and b.

    Dynamic programming over prefixes: L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j], else
    max(L[i-1][j], L[i][j-1]); kept one row at a time, O(len(a) * len(b)) time, O(len(b)) memory.
    """
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction, reference):
    """ROUGE-L F1 between two texts, over `words`.

    With L = LCS(prediction words, reference words): precision P = L / |prediction|,
    recall R = L / |reference|, F1 = 2PR / (P + R). Both empty -> 1.0; exactly one empty -> 0.0.
    """
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, reference):
    """True when the texts are equal after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def score_responses(entries):
    """Mean ROUGE-L F1 and exact-match rate over `entries`, plus the per-entry scores."""
    validate_entries(entries, RESPONSE_KEYS, source="responses")
    per_entry = [{"rouge_l_f1": rouge_l_f1(e["model_response"], e["output"]),
                  "exact_match": exact_match(e["model_response"], e["output"])} for e in entries]
    n = len(per_entry)
    return {"count": n,
            "rouge_l_f1": sum(s["rouge_l_f1"] for s in per_entry) / n,
            "exact_match": sum(s["exact_match"] for s in per_entry) / n,
            "per_entry": per_entry}


# ---------------------------------------------------------------------------------------------
# LLM judge through Ollama

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


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minigpt.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("responses", metavar="RESPONSES.json",
                        help="JSON list of entries with 'output' (expected) and 'model_response'")
    parser.add_argument("--judge-model", default=None, metavar="NAME",
                        help="also score with this Ollama model as a judge, e.g. llama3 (default: off)")
    parser.add_argument("--ollama-url", default=DEFAULT_OLLAMA_URL, metavar="URL",
                        help=f"address of the Ollama server (default: {DEFAULT_OLLAMA_URL})")
    parser.add_argument("--judge-timeout", default=DEFAULT_JUDGE_TIMEOUT, type=positive_seconds,
                        metavar="SECONDS", help=f"longest wait for one judge reply, from connecting to "
                                                f"its last byte (default: {DEFAULT_JUDGE_TIMEOUT:g})")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="write the metrics, with per-entry scores, to this JSON file")
    return parser.parse_args(argv)


def positive_seconds(text):
    """argparse type: a finite number of seconds > 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def main(argv=None):
    """Print the scores of a responses file; returns the exit code (2 for a bad file)."""
    args = parse_args(argv)
    try:  # the judge's prompt also needs each entry's instruction: check that up front
        entries = load_json_entries(args.responses, JUDGE_KEYS if args.judge_model else RESPONSE_KEYS,
                                    what="responses")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = score_responses(entries)
    print(f"{metrics['count']} responses in {args.responses}")
    print(f"  ROUGE-L F1   {metrics['rouge_l_f1']:.3f}")
    print(f"  exact match  {metrics['exact_match']:.1%}")
    metrics["judge"] = None
    if args.judge_model:
        try:
            metrics["judge"] = judge_responses(entries, model=args.judge_model, url=args.ollama_url,
                                               timeout=args.judge_timeout)
        except JudgeUnavailable as e:
            print(f"skipping the LLM judge: {e}")
    if metrics["judge"] is not None:
        judge = metrics["judge"]
        mean = "n/a" if judge["mean_score"] is None else f"{judge['mean_score']:.1f}"
        print(f"  judge ({judge['model']})  {mean} / 100 over {judge['scored']} scored responses")
    if args.out:
        try:
            write_json(args.out, metrics)
        except OSError as e:
            print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
            return 2
        print(f"metrics written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
