"""Talk to a GPT-2 model from the command line: a chat in the terminal or the browser, or one completion.

    python generate.py runs/NAME --chat                 # a run folder: its model, tokenizer and template
    python generate.py runs/NAME --serve                # the chat page and an OpenAI-style API, port 8000
    python generate.py runs/NAME/model-best.npz --instruction "Reverse 'qxbf'"
    python generate.py --model gpt2-small --prompt "The quick brown fox"
    python generate.py old.npz --chat --prompt-style chat     # a file from before model cards
    python generate.py --weights BASE.npz --lora runs/NAME/adapters-final.npz --instruction "Swap case" \\
        --input "aBc" --prompt-style phi3                     # a base + LoRA adapters

A model file written by minigpt carries a model card (files/model_card.py): its tokenizer and template,
so a run folder or model file needs no other setting; a --tokenizer or --prompt-style that contradicts
the card is refused. Files without one (written before cards, or pretrained GPT-2) take the tokenizer
their vocabulary implies and ask for the template when one is needed.

Only the new text is printed (not the prompt), on stdout, streamed as it is generated. A reply stops at
<|endoftext|>, at the template's end marker (<|end|> with the chat template; never printed), or after
--max-new-tokens tokens. The chats: minigpt/chat/ (terminal.py, server.py). A bad input ends the program
with one line `error: ...` on stderr and exit code 2.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

from minigpt import lora
from minigpt.chat.server import serve
from minigpt.chat.session import ChatSession
from minigpt.chat.stream import ReplyText
from minigpt.chat.terminal import chat
from minigpt.files.adapters import load_adapters
from minigpt.files.model_card import RUN_MODEL_FILE, model_file, read_card
from minigpt.files.weights import HF_WEIGHTS_NAME, HUB_REPOS, load_weights, pretrained_gpt2
from minigpt.generation import generate_tokens
from minigpt.prompts import PROMPT_STYLES, build_prompt, reply_end
from minigpt.tokenizer import TOKENIZERS, VOCAB_DIR_ENV, VOCAB_SIZES, encode, tokenizer_for

QUIT_WORDS = ("quit", "exit")
MODES = ("--prompt", "--instruction", "--interactive", "--chat", "--serve")


class UsageError(Exception):
    """A bad command line; main prints it as one `error: ...` line (argparse would add the usage)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = _Parser(prog="python generate.py",
                     description="Talk to a GPT-2 model: a chat in the terminal (--chat) or the browser "
                                 "(--serve), or one completion, streamed token by token.")
    source = parser.add_argument_group("model (one of)")
    source.add_argument("path", nargs="?", metavar="RUN_DIR_OR_MODEL",
                        help="a run folder (its model-final.npz), a minigpt .npz, a Hugging Face "
                             "model.safetensors or a directory holding one (with its config.json)")
    source.add_argument("--weights", metavar="PATH", help="the same as RUN_DIR_OR_MODEL")
    source.add_argument("--model", choices=list(HUB_REPOS),
                        help="OpenAI's pretrained GPT-2: downloaded from the Hugging Face hub once, then "
                             "loaded from the converted DATA_DIR/NAME.npz")
    source.add_argument("--data-dir", default="data",
                        help="where --model weights are downloaded and cached (default: %(default)s)")
    source.add_argument("--lora", metavar="ADAPTERS",
                        help="LoRA adapters (a run's adapters-final.npz or adapters-best.npz) to apply to "
                             "the base model they were trained on; merged into its weights")
    mode = parser.add_argument_group("what to do (one of)")
    mode.add_argument("--chat", action="store_true",
                      help="a conversation in the terminal: one message per line; /reset, /system TEXT, "
                           "/quit; Ctrl-C stops a reply")
    mode.add_argument("--serve", action="store_true",
                      help="serve the chat page and an OpenAI-style API (POST /v1/chat/completions)")
    mode.add_argument("--prompt", help="raw text to continue (an empty string starts from <|endoftext|>)")
    mode.add_argument("--instruction",
                      help="an instruction, wrapped in the model's template as in fine-tuning")
    mode.add_argument("--interactive", action="store_true",
                      help="read instructions from stdin, one per line, each answered on its own, until EOF, "
                           "an empty line or 'quit' (--raw: lines used as they are)")
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--input", help="optional input text for --instruction (the '### Input:' part)")
    prompt.add_argument("--system", help="with --chat: the system message the conversation starts with")
    prompt.add_argument("--prompt-style", choices=list(PROMPT_STYLES),
                        help="the template, for a model file without a model card (a file's card says it)")
    prompt.add_argument("--raw", action="store_true",
                        help="with --interactive: use each line as it is, without the template")
    server = parser.add_argument_group("server (--serve)")
    server.add_argument("--host", help="the address to listen on (default: 127.0.0.1, this machine only; "
                                       "0.0.0.0 opens it to the network)")
    server.add_argument("--port", type=int, help="the port to listen on (default: 8000; 0: any free port)")
    sampling = parser.add_argument_group("sampling (the defaults of the chat page and the API, with --serve)")
    sampling.add_argument("--max-new-tokens", type=int, default=100,
                          help="generate at most this many tokens (default: %(default)s)")
    sampling.add_argument("--temperature", type=float, default=0.0,
                          help="0 picks the most likely token (greedy); above 0 samples from "
                               "softmax(logits / temperature) (default: %(default)s)")
    sampling.add_argument("--top-k", type=int,
                          help="when sampling, draw only from the K most likely tokens (default: all)")
    sampling.add_argument("--seed", type=int,
                          help="seed for sampling, so a run can be repeated (default: a fresh seed; with "
                               "--serve, each request gives its own)")
    tokens = parser.add_argument_group("tokenizer")
    tokens.add_argument("--tokenizer", choices=TOKENIZERS,
                        help=f"for a model file without a model card (default: gpt2 for a vocabulary of "
                             f"{VOCAB_SIZES['gpt2']}, byte for {VOCAB_SIZES['byte']})")
    tokens.add_argument("--vocab-dir", metavar="DIR",
                        help=f"folder with GPT-2's encoder.json and vocab.bpe, to build the gpt2 tokenizer "
                             f"offline (default: ${VOCAB_DIR_ENV}, else tiktoken downloads them)")
    return parser


def check_args(args):
    """Reject inconsistent or out-of-range options before anything is loaded."""
    if args.path is not None and args.weights is not None:
        raise UsageError("give the model once: RUN_DIR_OR_MODEL or --weights PATH")
    args.weights = args.weights if args.weights is not None else args.path
    if (args.weights is None) == (args.model is None):
        raise UsageError("give exactly one model: RUN_DIR_OR_MODEL (or --weights PATH), or --model NAME")
    given = [flag for flag in MODES if getattr(args, flag[2:]) not in (None, False)]
    if len(given) != 1:
        got = f" (got {', '.join(given)})" if given else ""
        raise UsageError(f"give exactly one of {', '.join(MODES)}{got}")
    for flag, needs, ok in (("--input", "--instruction", args.instruction is not None),
                            ("--raw", "--interactive", args.interactive), ("--system", "--chat", args.chat),
                            ("--host", "--serve", args.serve), ("--port", "--serve", args.serve)):
        if getattr(args, flag[2:]) not in (None, False) and not ok:
            raise UsageError(f"{flag} needs {needs}")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.seed is not None and args.serve:
        raise UsageError('--seed does not apply to --serve: each request gives its own "seed"')
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be a port number (0 to 65535), got {args.port}")
    if args.lora is not None and not os.path.isfile(args.lora):  # before a base is loaded, maybe downloaded
        raise UsageError(f"adapters file not found: {args.lora}")


def weights_path(path):
    """The model file a path names (a run folder: its model-final.npz), or a one-line error."""
    file = model_file(path)
    if file.is_dir() and not (file / HF_WEIGHTS_NAME).is_file():
        raise UsageError(f"{path}: a folder with neither {RUN_MODEL_FILE} (a finished run's) nor "
                         f"{HF_WEIGHTS_NAME}; give a model file, e.g. {Path(path) / 'model-best.npz'}")
    return file


def model_settings(args, path):
    """(tokenizer, template) of the model: its card's, when the file has one (a --tokenizer or
    --prompt-style that contradicts it is refused); else the flags' (None when not given)."""
    card = read_card(path) if path is not None else None
    if card is None:
        return args.tokenizer, args.prompt_style
    for flag, key in (("--tokenizer", "tokenizer"), ("--prompt-style", "prompt_style")):
        given = getattr(args, key)
        if given is not None and given != card[key]:
            raise UsageError(f"{flag} {given} contradicts the model card of {path}, which says {card[key]}")
    return card["tokenizer"], card["prompt_style"]


def needs_template(args):
    return args.instruction is not None or args.chat or args.serve or (args.interactive and not args.raw)


def load_model(args, path):
    """The model file or --model base, with the --lora adapters merged in (the speed of the base)."""
    model = load_weights(path) if path is not None else pretrained_gpt2(args.model, args.data_dir)
    if args.lora is not None:
        load_adapters(model, args.lora)
        lora.merge_lora(model)
    return model


def prompt_text(text, style, raw=False, input_text=None):
    """Raw text as is, or an instruction (+ input) wrapped as in fine-tuning: prompt + response header."""
    if raw:
        return text
    return build_prompt({"instruction": text, "input": input_text or ""}, style)


def stream_completion(model, tokenizer, prompt, write, max_new_tokens=100, temperature=0.0, top_k=None,
                      rng=None, stops=()):
    """Generate a continuation of `prompt`, calling write(piece) as each piece of text is ready.

    Stops at <|endoftext|> or a text in `stops` (neither written), or after max_new_tokens tokens. A prompt
    longer than the model's context is cropped to its last context_length tokens. Returns the new token ids.
    """
    ids = encode(tokenizer, prompt) or [tokenizer.eot_token]   # an empty prompt: unconditional text
    idx = np.array([ids], dtype=np.int64)                        # (1, T)
    reply = ReplyText(tokenizer, stops)
    new_ids = generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                              eos_id=tokenizer.eot_token, rng=rng)                 # (1,) at a time
    tokens = (int(next_ids[0]) for next_ids in new_ids)
    for piece in reply.pieces(tokens):
        write(piece)
    return reply.ids


def run(args, out):
    check_args(args)
    path = weights_path(args.weights) if args.weights is not None else None
    tokenizer_name, style = model_settings(args, path)
    if style is None and needs_template(args):
        raise UsageError(f"{path or args.model} has no model card (it was written before minigpt kept one, "
                         f"or elsewhere), so its template is unknown: give --prompt-style "
                         f"({', '.join(PROMPT_STYLES)})")
    model = load_model(args, path)
    tokenizer = tokenizer_for(model.cfg.vocab_size, tokenizer_name, args.vocab_dir)
    rng = np.random.default_rng(args.seed)
    name = str(args.weights if args.weights is not None else args.model)

    def write(piece):
        out.write(piece)
        out.flush()

    def note(line):
        print(line, file=sys.stderr, flush=True)

    if args.serve:
        defaults = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k}
        return serve(model, tokenizer, style, name, defaults, args.host or "127.0.0.1",
                     8000 if args.port is None else args.port, log=note)
    if args.chat:
        note(f"chat with {path or name}: {style} template, {tokenizer.name} tokenizer, context "
             f"{model.cfg.context_length} tokens")
        session = ChatSession(model, tokenizer, style, args.system)
        return chat(session, read_line(), write, note, args.max_new_tokens, args.temperature, args.top_k, rng)

    def answer(prompt, stops):
        stream_completion(model, tokenizer, prompt, write, args.max_new_tokens, args.temperature,
                          args.top_k, rng, stops)
        write("\n")

    if not args.interactive:
        if args.prompt is not None:
            answer(args.prompt, ())
        else:
            answer(prompt_text(args.instruction, style, input_text=args.input), [reply_end(style)])
        return 0
    read = read_line()
    while True:
        line = read("> ").rstrip("\r\n")
        if not line.strip() or line.strip().lower() in QUIT_WORDS:   # EOF reads as ""
            return 0
        answer(prompt_text(line, style, raw=args.raw), () if args.raw else [reply_end(style)])


def read_line():
    """A function read(marker) reading one line of stdin ("" at its end); it shows the marker on stderr to
    a person at a terminal, so stdout holds only the generated text."""
    show_marker = sys.stdin.isatty()

    def read(marker):
        if show_marker:
            print(marker, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if show_marker and not line:                     # Ctrl-D: the marker's line ends
            print(file=sys.stderr)
        return line
    return read


def main(argv=None, out=None):
    """Run the CLI on `argv` (default: sys.argv[1:]), printing to `out` (default: stdout) -> exit code."""
    out = out if out is not None else sys.stdout
    try:
        return run(build_parser().parse_args(argv), out)
    except BrokenPipeError:   # the reader went away (`... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 1
    except (UsageError, ValueError, TypeError, KeyError, FileNotFoundError, ConnectionError, OSError) as e:
        message = " ".join(str(e).split())   # one line, whatever the message
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
