"""Fixtures shared by test files: a fake Ollama server on 127.0.0.1 (test_evaluate.py, test_compare.py)."""
import http.server
import json
import socket
import threading
import time

import pytest


@pytest.fixture
def ollama():
    """A fake Ollama on 127.0.0.1: answers /api/chat with the queued replies, records each request.

    With "trickle" set, the whole answer (status line, headers, body) goes out one byte at a time,
    that many seconds apart; with "raw" set, that body is sent as it is; with "dead_after" set, every
    request after that many is read and the connection closed without a word, as by a server that died."""
    state = {"replies": [], "requests": [], "status": 200, "trickle": None, "raw": None, "dead_after": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            request = self.rfile.read(int(self.headers["Content-Length"]))
            state["requests"].append((self.path, json.loads(request)))
            if state["dead_after"] is not None and len(state["requests"]) > state["dead_after"]:
                self.close_connection = True
                return
            if state["trickle"]:
                return self.trickle()
            if state["raw"] is not None:
                body = state["raw"]
            elif state["status"] == 200:
                body = {"model": "fake", "message": {"role": "assistant", "content": state["replies"].pop(0)},
                        "done": True}
            else:
                body = {"error": "model 'nope' not found"}
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def trickle(self):
            payload = json.dumps({"message": {"role": "assistant", "content": "85"}, "done": True}).encode()
            answer = (f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
            try:
                for i in range(len(answer)):
                    time.sleep(state["trickle"])
                    self.wfile.write(answer[i:i + 1])
            except OSError:  # the client hung up, as it should
                pass

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # shutdown() waits up to one poll interval (0.5 s by default): poll often to keep the tests fast
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_url():
    """A URL on 127.0.0.1 where nothing listens (a port that was just free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
