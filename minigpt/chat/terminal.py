"""The chat in the terminal: `python generate.py RUN_DIR --chat`.

Each line is a message (a line that ends with a backslash goes on on the next line: a message of several
lines); the reply streams to stdout, and notes (what was dropped, a reply cut short) go to stderr, so
stdout holds the replies alone. A line starting with "/" is a command:

    /reset          a new conversation (the system message stays)
    /system TEXT    a new conversation under the system message TEXT (/system alone: none)
    /quit           the end (so do Ctrl-D, or Ctrl-C while no reply is being written)

Ctrl-C while a reply is being written stops it; the part shown is kept as the reply, so the model
sees what the user saw, and the chat goes on.
"""
COMMANDS = "/reset, /system TEXT, /quit"


def chat(session, read_line, write, note, max_new_tokens, temperature=0.0, top_k=None, rng=None):
    """Talk until the input ends or /quit: read_line(marker) -> a line or "" at the end (marker: what a
    person at a terminal is shown, "> ", or "... " for a message that goes on); write(text) for replies,
    note(text) for everything else. Returns the exit code, 0."""
    note(f"commands: {COMMANDS}; Ctrl-C stops a reply, Ctrl-D ends the chat")
    if session.one_exchange:
        note(f"the {session.style} template holds one exchange, so each message is answered on its own "
             f"(a model trained with --prompt-style chat keeps the conversation)")
    while True:
        line = read_line("> ")
        while line.rstrip("\r\n").endswith("\\"):          # the message goes on on the next line
            line = line.rstrip("\r\n")[:-1] + "\n" + read_line("... ")
        if not line:                                       # the end of the input
            return 0
        text = line.strip()
        if text.startswith("/"):
            if run_command(session, text, note):
                return 0
            continue
        if text:
            answer(session, text, write, note, max_new_tokens, temperature, top_k, rng)


def run_command(session, text, note):
    """Carry out a /command; True when it ends the chat."""
    command, _, argument = text.partition(" ")
    if command in ("/quit", "/exit"):
        return True
    if command == "/reset":
        session.reset()
        note("(a new conversation)")
    elif command == "/system":
        try:
            session.set_system(argument.strip())
            under = "under that system message" if session.system else "no system message"
            note(f"(a new conversation, {under})")
        except ValueError as e:
            note(f"({e})")
    else:
        note(f"(unknown command {command}; the commands: {COMMANDS})")
    return False


def answer(session, text, write, note, max_new_tokens, temperature, top_k, rng):
    """One exchange: the user's message, then the reply streamed to write()."""
    try:
        dropped = session.ask(text, max_new_tokens)
    except ValueError as e:
        note(f"({e}; not sent)")
        return
    if dropped:
        note(f"(the oldest {dropped} exchange{'s' if dropped > 1 else ''} dropped: the conversation outgrew "
             f"the context window of {session.context_length} tokens)")
    replying = session.reply(temperature, top_k, rng)
    try:
        for piece in replying:
            write(piece)
    except KeyboardInterrupt:
        replying.close()                                   # keeps the part shown (session.reply)
        write("\n")
        note("(stopped; the part shown is kept as the reply)")
        return
    write("\n")
    if session.last.finish_reason == "length":
        note(f"(cut at {len(session.last.ids)} tokens: --max-new-tokens, or the room left in the context "
             f"window)")
