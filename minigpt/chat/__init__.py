"""Talking to a model: a conversation whose KV cache is kept across turns (session.py), the text of a
reply as it streams (stream.py), the terminal chat (terminal.py), and a chat in the browser with an
OpenAI-style API (server.py, api.py, page.html). `python generate.py RUN_DIR --chat` or `--serve`."""
