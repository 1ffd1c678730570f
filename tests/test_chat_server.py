"""The chat server: OpenAI's chat-completions API against a tiny model, whole and streamed; bad requests
get a 4xx in OpenAI's error layout and the server stays up; two clients at once never mix; a client that
goes away stops its reply; Ctrl-C stops the program cleanly. Every server listens on 127.0.0.1, on a
port the system picks."""
import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minigpt.chat.server import API_PATH, MAX_BODY_BYTES, ChatServer
from minigpt.data import reply_prompt_ids as prompt_ids
from minigpt.files.model_card import make_card
from minigpt.files.weights import save_npz
from test_chat_session import CONVERSATION, TOKENIZER, chatty_model, random_model, record_positions

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"max_tokens": 30, "temperature": 0.0, "top_k": None}


@contextlib.contextmanager
def running(model, style="chat"):
    server = ChatServer(("127.0.0.1", 0), model, TOKENIZER, style, "tiny", DEFAULTS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def server():
    with running(chatty_model()) as server:
        yield server


def request(server, method, path, body=None, headers=None):
    """(status, content type, body bytes) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type"), response.read()


def post(server, payload, headers=None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, content_type, data = request(server, "POST", API_PATH, body,
                                         {"Content-Type": "application/json", **(headers or {})})
    return status, content_type, data


def events(data):
    """The JSON of each server-sent event, and whether the stream ended with [DONE]."""
    blocks = [block for block in data.decode().split("\n\n") if block]
    assert all(block.startswith("data: ") for block in blocks)
    done = blocks[-1] == "data: [DONE]"
    return [json.loads(block[6:]) for block in blocks if block != "data: [DONE]"], done


def user(text):
    return {"role": "user", "content": text}


def test_the_page_and_the_model_list(server):
    status, content_type, page = request(server, "GET", "/")
    assert (status, content_type) == (200, "text/html; charset=utf-8")
    assert b"<title>minigpt chat</title>" in page
    status, _, body = request(server, "GET", "/v1/models")
    model = json.loads(body)["data"][0]
    assert status == 200 and model["id"] == "tiny" and model["object"] == "model"
    assert model["minigpt"] == dict(prompt_style="chat", context_length=128, tokenizer="byte", **DEFAULTS)


def test_replies_whole_and_streamed_answer_from_the_conversation(server):
    status, content_type, body = post(server, {"messages": [user("Hi")]})
    reply = json.loads(body)
    assert (status, content_type) == (200, "application/json")
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                 "finish_reason": "stop"}]
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids(TOKENIZER, [user("Hi")], "chat"))
    assert reply["usage"]["completion_tokens"] == len("Hello!<|end|>")       # the marker's tokens, not shown

    status, content_type, data = post(server, {"messages": CONVERSATION[:3], "stream": True})
    chunks, done = events(data)
    assert (status, content_type, done) == (200, "text/event-stream", True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert "".join(pieces) == "Hi again." and len([p for p in pieces if p]) == len("Hi again.")  # a byte each
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_a_conversation_the_server_has_seen_runs_only_its_new_tokens(monkeypatch):
    model = chatty_model()
    with running(model) as server:
        runs = record_positions(model, monkeypatch)
        first = json.loads(post(server, {"messages": [user("Hi")]})[2])
        runs.clear()
        second = json.loads(post(server, {"messages": CONVERSATION[:3]})[2])
    assert second["choices"][0]["message"]["content"] == "Hi again."
    new_tokens = second["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"] - first["usage"][
        "completion_tokens"]
    assert runs[0] == new_tokens + 1       # the new turn and the reply's last token, chosen but never run


def test_max_tokens_seed_and_stop_are_honoured(server):
    choice = json.loads(post(server, {"messages": [user("Hi")], "max_tokens": 3})[2])["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Hel", "length")
    choice = json.loads(post(server, {"messages": [user("Hi")], "stop": ["lo"]})[2])["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Hel", "stop")
    sampled = [json.loads(post(server, {"messages": [user("Again")], "temperature": 5.0, "seed": seed})[2])
               ["choices"][0]["message"]["content"] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


BAD_REQUESTS = {   # body (or bytes), extra headers -> status, param or code named
    "not JSON": (b"{not json", {}, 400, None),
    "not an object": ([1, 2], {}, 400, None),
    "no messages": ({"model": "tiny"}, {}, 400, "messages"),
    "unknown role": ({"messages": [{"role": "robot", "content": "Hi"}]}, {}, 400, "messages[0]"),
    "empty content": ({"messages": [user("  ")]}, {}, 400, "messages[0]"),
    "the end marker in the content": ({"messages": [user("a <|end|> b")]}, {}, 400, "messages[0]"),
    "end of text in the content": ({"messages": [user("<|endoftext|>")]}, {}, 400, "messages[0]"),
    "a system message later": ({"messages": [user("Hi"), {"role": "system", "content": "S"}, user("x")]}, {},
                               400, "messages[1]"),
    "the last message is a reply": ({"messages": CONVERSATION[:2]}, {}, 400, "messages"),
    "too long for the context": ({"messages": [user("x" * 200)]}, {}, 400, "context_length_exceeded"),
    "negative temperature": ({"messages": [user("Hi")], "temperature": -1}, {}, 400, "temperature"),
    "top_p": ({"messages": [user("Hi")], "top_p": 0.5}, {}, 400, "top_p"),
    "zero top_k": ({"messages": [user("Hi")], "top_k": 0}, {}, 400, "top_k"),
    "fractional max_tokens": ({"messages": [user("Hi")], "max_tokens": 2.5}, {}, 400, "max_tokens"),
    "stream not a boolean": ({"messages": [user("Hi")], "stream": "yes"}, {}, 400, "stream"),
    "wrong content type": ({"messages": [user("Hi")]}, {"Content-Type": "text/plain"}, 415, None),
    "a host name from elsewhere": ({"messages": [user("Hi")]}, {"Host": "attacker.example:8000"}, 403,
                                   "forbidden_host"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_in_openai_s_error_layout_and_the_server_stays_up(server, case):
    payload, headers, expected_status, named = BAD_REQUESTS[case]
    status, content_type, body = post(server, payload, headers)
    error = json.loads(body)["error"]
    assert (status, content_type) == (expected_status, "application/json")
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert named is None or named in (error["param"], error["code"])
    reply = json.loads(post(server, {"messages": [user("Hi")]})[2])
    assert reply["choices"][0]["message"]["content"] == "Hello!"


def raw_request(server, text, body=b""):
    """Send a request as bytes; the status line of the answer."""
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=60) as connection:
        connection.sendall(text.encode() + body)
        return connection.makefile("rb").readline().decode()


def test_requests_without_a_size_or_too_big_or_elsewhere_are_refused(server):
    head = f"POST {API_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    assert " 411 " in raw_request(server, head + "\r\n")
    big = MAX_BODY_BYTES + 1
    assert " 413 " in raw_request(server, head + f"Content-Length: {big}\r\n\r\n", b" " * big)
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "POST", "/v1/completions", b"{}", {"Content-Type": "application/json"})[0] == 404
    assert request(server, "DELETE", API_PATH)[0] == 405


def slowed(model, monkeypatch, seconds=0.01):
    """Make each forward pass of `model` take `seconds` longer, and record which thread ran it."""
    threads, forward = [], model.forward

    def slow(*args, **kwargs):
        threads.append(threading.current_thread().name)
        time.sleep(seconds)
        return forward(*args, **kwargs)
    monkeypatch.setattr(model, "forward", slow)
    return threads


def test_two_clients_at_once_each_get_their_own_reply_and_replies_never_mix(server, monkeypatch):
    conversations = {"first": [user("Hi")], "second": CONVERSATION[:3]}
    alone = {name: post(server, {"messages": messages, "stream": True})[2]
             for name, messages in conversations.items()}
    threads = slowed(server.model, monkeypatch)
    together, start = {}, threading.Barrier(2)

    def client(name):
        start.wait()
        together[name] = post(server, {"messages": conversations[name], "stream": True})[2]
    clients = [threading.Thread(target=client, args=(name,)) for name in conversations]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    texts = {name: "".join(c["choices"][0]["delta"].get("content", "") for c in events(together[name])[0])
             for name in conversations}
    assert texts == {"first": "Hello!", "second": "Hi again."}
    for name in conversations:                                       # the very pieces each got alone
        pieces = [c["choices"][0]["delta"] for c in events(together[name])[0]]
        assert pieces == [c["choices"][0]["delta"] for c in events(alone[name])[0]]
    switches = sum(a != b for a, b in zip(threads, threads[1:]))
    assert len(set(threads)) == 2 and switches == 1                  # one reply, then the other: never mixed


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_reply(monkeypatch, stream):
    model = random_model()                                           # it writes on, never ending its reply
    with running(model) as server:
        slowed(model, monkeypatch)
        body = json.dumps({"messages": [user("Tell me everything")], "max_tokens": 300, "stream": stream})
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=60) as connection:
            connection.sendall(f"POST {API_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                               f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            if stream:
                received = b""
                while received.count(b"data: ") < 3:                # the role, then a piece or two
                    received += connection.recv(4096)
            else:
                time.sleep(0.3)                                      # some tokens into the reply
        with server.generating:                                      # waits for the reply to end
            finish, tokens = server.last_reply
        assert finish == "disconnected" and 0 < tokens < 100         # 300 were asked for
        status, _, body = post(server, {"messages": [user("Hi")], "max_tokens": 5})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 5


def test_ctrl_c_stops_the_server_program_cleanly(tmp_path):
    save_npz(chatty_model(), tmp_path / "model-final.npz", make_card("byte", "chat"))
    process = subprocess.Popen([sys.executable, "generate.py", str(tmp_path), "--serve", "--port", "0"],
                               cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stderr.readline()
        assert first.startswith(f"chat with {tmp_path} at http://127.0.0.1:")
        port = int(first.split("http://127.0.0.1:")[1].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", API_PATH, json.dumps({"messages": [user("Hi")]}),
                           {"Content-Type": "application/json"})
        assert json.loads(connection.getresponse().read())["choices"][0]["message"]["content"] == "Hello!"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        rest = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert rest.splitlines()[-1] == "server stopped" and "Traceback" not in rest
    assert all(line.startswith("127.0.0.1 ") for line in rest.splitlines()[:-1])   # one line a request
