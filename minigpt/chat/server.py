"""The chat in the browser: `python generate.py RUN_DIR --serve [--port N] [--host H]`.

Python's own HTTP server (http.server; nothing to install) serves three things:

    GET  /                     page.html: the conversation, a text box, tokens as they come, stop, reset
    GET  /v1/models            this model, as OpenAI lists models (and its template and settings)
    POST /v1/chat/completions  a reply in OpenAI's layout (api.py), whole or streamed as server-sent events

The client sends the whole conversation with every request, as OpenAI's API has it, so several tabs are
several conversations. Requests are taken in threads, but replies are generated one at a time (a lock), so
two never mix. The server keeps a few KV caches (CACHE_SLOTS): a request that continues a conversation it
has seen runs only its new tokens. A client that goes away (a closed tab, the page's stop button) stops
its reply within a token. It listens on 127.0.0.1 unless told otherwise, and then answers only requests
that name this machine (the Host header), so a web page elsewhere cannot reach it through a DNS name of
its own. Nor can such a page post JSON to it: the browser asks first (OPTIONS, CORS), which this server
never grants.
"""
import http.server
import json
import select
import socket
import threading
from pathlib import Path

import numpy as np

from ..generation import CachedContext
from ..prompts import reply_end
from .api import DONE, ApiError, chunk, completion, new_id, parse_request
from ..data import reply_prompt_ids
from .stream import ReplyText

PAGE = Path(__file__).with_name("page.html")
API_PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 1 << 20       # a request's body, at most (a conversation that fills 1024 tokens is ~5 KB)
DRAIN_BYTES = 16 << 20         # a longer body is read (and dropped) up to this, so the client sees the 413
CACHE_SLOTS = 4                # KV caches kept for conversations (gpt2-small: 75 MB each when full)
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")


class ChatServer(http.server.ThreadingHTTPServer):
    daemon_threads = True      # a reply being written does not keep Ctrl-C from ending the program

    def __init__(self, address, model, tokenizer, style, name, defaults, log=None):
        """defaults: {"max_tokens", "temperature", "top_k"} for requests that give none; log(line) or None."""
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.model, self.tokenizer, self.style, self.name = model, tokenizer, style, name
        self.defaults, self.log = defaults, log
        self.local_only = address[0] in ("127.0.0.1", "localhost", "::1")
        self.page = PAGE.read_bytes()
        self.generating = threading.Lock()   # one reply at a time
        self.contexts = []                   # CachedContexts, the least recently used first
        self.last_reply = None               # (finish_reason or "disconnected", tokens) of the latest reply

    def context_for(self, ids):
        """The cache to answer `ids` with: the one that shares the most leading tokens with it, unless that
        would overwrite part of another conversation while a slot is free."""
        best = max(self.contexts, key=lambda context: context.shared_length(ids), default=None)  # ties: LRU
        if best is None or (best.shared_length(ids) < best.cache.length and len(self.contexts) < CACHE_SLOTS):
            best = CachedContext(self.model)
        else:
            self.contexts.remove(best)
        self.contexts.append(best)
        return best

    def description(self):
        """This model in OpenAI's list of models, with what the page needs to know."""
        cfg = self.model.cfg
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "minigpt",
                "minigpt": {"prompt_style": self.style, "context_length": cfg.context_length,
                            "tokenizer": self.tokenizer.name, **self.defaults}}


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "minigpt"
    timeout = 60               # seconds a client may take to send its request, or to take a piece of a reply

    def do_GET(self):
        try:
            self.check_host()
            if self.path in ("/", "/index.html"):
                self.send_body(200, self.server.page, "text/html; charset=utf-8")
            elif self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [self.server.description()]})
            else:
                raise ApiError(404, f"nothing at {self.path}", code="not_found")
        except ApiError as e:
            self.send_json(e.status, e.body())

    def do_POST(self):
        server = self.server
        try:
            self.check_host()
            if self.path != API_PATH:
                raise ApiError(404, f"nothing at {self.path}; the API is POST {API_PATH}", code="not_found")
            request = parse_request(self.read_body(), server.style, server.defaults)
            ids = reply_prompt_ids(server.tokenizer, request.messages, server.style)
            context_length = server.model.cfg.context_length
            if len(ids) >= context_length:
                raise ApiError(400, f"the conversation takes {len(ids)} tokens with the template, and the "
                                    f"model's context window holds {context_length} with the reply: drop its "
                                    f"oldest messages", "messages", "context_length_exceeded")
        except ApiError as e:
            self.send_json(e.status, e.body())
            return
        self.answer(request, ids)

    def do_PUT(self):
        self.send_json(405, ApiError(405, f"{self.command} is not served; POST {API_PATH}").body())

    do_DELETE = do_PATCH = do_PUT

    def check_host(self):
        name = (self.headers.get("Host") or "").strip().lower()
        name = name.split("]")[0] + "]" if name.startswith("[") else name.split(":")[0]
        if self.server.local_only and name not in LOCAL_NAMES:
            raise ApiError(403, f"this server answers requests for {', '.join(LOCAL_NAMES)} only, not "
                                f"{name!r}", code="forbidden_host")

    def read_body(self):
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, "the body must be JSON, sent with Content-Type: application/json")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise ApiError(411, "Content-Length (the body's size in bytes) is required")
        if int(length) > MAX_BODY_BYTES:
            self.rfile.read(min(int(length), DRAIN_BYTES))
            raise ApiError(413, f"the body has {int(length):,} bytes; at most {MAX_BODY_BYTES:,} are taken")
        return self.rfile.read(int(length))

    def answer(self, request, ids):
        """Generate the reply (one at a time), streamed as it comes or sent whole; stop if the client goes."""
        server, tokenizer = self.server, self.server.tokenizer
        max_tokens = min(request.max_tokens, server.model.cfg.context_length - len(ids))
        reply_id, reply = new_id(), ReplyText(tokenizer, [reply_end(server.style), *request.stop])
        with server.generating:
            if self.client_gone():             # it went away while an earlier reply was being written
                server.last_reply = ("disconnected", 0)
                return
            try:
                if request.stream:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()
                    self.wfile.write(chunk(reply_id, server.name, {"role": "assistant", "content": ""}))
                tokens = server.context_for(ids).generate(ids, max_tokens, request.temperature, request.top_k,
                                                          np.random.default_rng(request.seed),
                                                          tokenizer.eot_token)
                for piece in reply.pieces(tokens):
                    if request.stream:
                        self.wfile.write(chunk(reply_id, server.name, {"content": piece}))
                    if self.client_gone():
                        break
            except OSError:                    # the client went away while a piece was sent to it
                pass
            server.last_reply = (reply.finish_reason or "disconnected", len(reply.ids))
        if reply.finish_reason is None:
            return
        try:
            if request.stream:
                self.wfile.write(chunk(reply_id, server.name, {}, reply.finish_reason) + DONE)
            else:
                self.send_json(200, completion(reply_id, server.name, reply.text, reply.finish_reason,
                                               len(ids), len(reply.ids)))
        except OSError:
            pass

    def client_gone(self):
        """True when the client closed its end: the socket reads as ended (or fails)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send_json(self, status, body):
        self.send_body(status, json.dumps(body).encode(), "application/json")

    def send_body(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")


def serve(model, tokenizer, style, name, defaults, host="127.0.0.1", port=8000, log=None):
    """Serve the chat until Ctrl-C; log(line) tells where (and each request). Returns the exit code, 0."""
    log = log or (lambda line: None)
    server = ChatServer((host, port), model, tokenizer, style, name, defaults, log)
    url_host = f"[{host}]" if ":" in host else host
    log(f"chat with {name} at http://{url_host}:{server.server_port}/ (the API: POST {API_PATH}); "
        f"Ctrl-C stops the server")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("server stopped")
    finally:
        server.server_close()
    return 0
