"""Generate text with a GPT-2 model from the command line, streaming each token as it is chosen.

    python generate.py --model gpt2-small --prompt "The quick brown fox"
    python generate.py --weights runs/finetuned.npz --instruction "Rewrite in passive voice." \\
        --input "The cat chased the mouse." --temperature 0.7 --top-k 40 --seed 1
    python generate.py --weights runs/finetuned.npz --interactive     # one instruction per line
    python generate.py --weights BASE.npz --lora runs/NAME/adapters-final.npz --instruction "Swap case" \\
        --input "aBc" --prompt-style phi3                                 # a base + LoRA adapters

Only the new text is printed (not the prompt), on stdout, followed by a newline. Generation stops
at <|endoftext|> or after --max-new-tokens tokens. A bad input ends the program with one line
`error: ...` on stderr and exit code 2.
"""
import argparse
import codecs
import math
import os
import sys

import numpy as np

from minigpt import lora
from minigpt.files.adapters import load_adapters
from minigpt.files.weights import HUB_REPOS, load_weights, pretrained_gpt2
from minigpt.generation import generate_tokens
from minigpt.prompts import PROMPT_STYLES, build_prompt
from minigpt.tokenizer import TOKENIZERS, VOCAB_DIR_ENV, VOCAB_SIZES, encode, get_tokenizer

QUIT_WORDS = ("quit", "exit")


class UsageError(Exception):
    """A bad command line; main prints it as one `error: ...` line (argparse would add the usage)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = _Parser(prog="python generate.py",
                     description="Generate text with a GPT-2 model (greedy, or temperature/top-k sampling). "
                                 "Prints only the new text, streamed token by token.")
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--weights", metavar="PATH",
                        help="a minigpt .npz, a Hugging Face model.safetensors, or a directory holding one "
                             "(with its config.json)")
    source.add_argument("--model", choices=list(HUB_REPOS),
                        help="OpenAI's pretrained GPT-2: downloaded from the Hugging Face hub once, then "
                             "loaded from the converted DATA_DIR/NAME.npz")
    source.add_argument("--data-dir", default="data",
                        help="where --model weights are downloaded and cached (default: %(default)s)")
    source.add_argument("--lora", metavar="ADAPTERS",
                        help="LoRA adapters (a run's adapters-final.npz or adapters-best.npz) to apply to "
                             "the --weights or --model base they were trained on; merged into its weights")
    prompt = parser.add_argument_group("prompt (one of)")
    prompt.add_argument("--prompt", help="raw text to continue (an empty string starts from <|endoftext|>)")
    prompt.add_argument("--instruction",
                        help="an instruction, wrapped in --prompt-style's template as in fine-tuning")
    prompt.add_argument("--interactive", action="store_true",
                        help="read prompts from stdin, one per line, until EOF, an empty line or 'quit'; "
                             "each line is an instruction wrapped in --prompt-style unless --raw is given")
    prompt.add_argument("--input", help="optional input text for --instruction (the '### Input:' part)")
    prompt.add_argument("--prompt-style", choices=list(PROMPT_STYLES), default="alpaca",
                        help="template for --instruction and --interactive (default: %(default)s)")
    prompt.add_argument("--raw", action="store_true",
                        help="with --interactive: use each line as it is, without the prompt template")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=100,
                          help="generate at most this many tokens (default: %(default)s)")
    sampling.add_argument("--temperature", type=float, default=0.0,
                          help="0 picks the most likely token (greedy); above 0 samples from "
                               "softmax(logits / temperature) (default: %(default)s)")
    sampling.add_argument("--top-k", type=int,
                          help="when sampling, draw only from the K most likely tokens (default: all)")
    sampling.add_argument("--seed", type=int,
                          help="seed for sampling, so a run can be repeated (default: a fresh seed)")
    tokens = parser.add_argument_group("tokenizer")
    tokens.add_argument("--tokenizer", choices=TOKENIZERS,
                        help=f"default: gpt2 for a model with vocabulary {VOCAB_SIZES['gpt2']}, byte for "
                             f"{VOCAB_SIZES['byte']}")
    tokens.add_argument("--vocab-dir", metavar="DIR",
                        help=f"folder with GPT-2's encoder.json and vocab.bpe, to build the gpt2 tokenizer "
                             f"offline (default: ${VOCAB_DIR_ENV}, else tiktoken downloads them)")
    return parser


def check_args(args):
    """Reject inconsistent or out-of-range options before anything is loaded."""
    if (args.weights is None) == (args.model is None):
        raise UsageError("give exactly one of --weights PATH or --model NAME")
    given = [flag for flag, value in (("--prompt", args.prompt), ("--instruction", args.instruction),
                                      ("--interactive", args.interactive or None)) if value is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --prompt, --instruction or --interactive"
                         + (f" (got {', '.join(given)})" if given else ""))
    if args.input is not None and args.instruction is None:
        raise UsageError("--input needs --instruction")
    if args.raw and not args.interactive:
        raise UsageError("--raw only applies to --interactive")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.lora is not None and not os.path.isfile(args.lora):  # before a base is loaded, maybe downloaded
        raise UsageError(f"adapters file not found: {args.lora}")


def load_model(args):
    """The --weights or --model base, with the --lora adapters merged in (the speed of the base)."""
    if args.weights is not None:
        model = load_weights(args.weights)
    else:
        model = pretrained_gpt2(args.model, args.data_dir)
    if args.lora is not None:
        load_adapters(model, args.lora)
        lora.merge_lora(model)
    return model


def choose_tokenizer(args, vocab_size):
    """The tokenizer to use with a model of `vocab_size`; its vocabulary must match exactly.

    Checked against the known sizes first, so a mismatch never waits for a tokenizer download.
    """
    name = args.tokenizer or {size: name for name, size in VOCAB_SIZES.items()}.get(vocab_size)
    if name is None:
        raise ValueError(f"the model's vocabulary has {vocab_size} tokens, which matches no tokenizer "
                         f"(gpt2 has {VOCAB_SIZES['gpt2']}, byte {VOCAB_SIZES['byte']})")
    if VOCAB_SIZES[name] != vocab_size:
        raise ValueError(f"tokenizer {name} has {VOCAB_SIZES[name]} tokens but the model's vocabulary "
                         f"has {vocab_size}; choose another --tokenizer")
    return get_tokenizer(name, args.vocab_dir)


def prompt_text(text, style, raw=False, input_text=None):
    """Raw text as is, or an instruction (+ input) wrapped as in fine-tuning: prompt + response header."""
    if raw:
        return text
    return build_prompt({"instruction": text, "input": input_text or ""}, style)


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


def stream_completion(model, tokenizer, prompt, write, max_new_tokens=100, temperature=0.0, top_k=None,
                      rng=None):
    """Generate a continuation of `prompt`, calling write(piece) as each piece of text is ready.

    Stops at <|endoftext|> (not written) or after max_new_tokens tokens. A prompt longer than the
    model's context is cropped to its last context_length tokens. Returns the new token ids.
    """
    ids = encode(tokenizer, prompt) or [tokenizer.eot_token]   # an empty prompt: unconditional text
    idx = np.array([ids], dtype=np.int64)                        # (1, T)
    stream, new_ids = TextStream(tokenizer), []
    for next_ids in generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                    eos_id=tokenizer.eot_token, rng=rng):
        token_id = int(next_ids[0])
        if token_id == tokenizer.eot_token:
            break
        new_ids.append(token_id)
        piece = stream.feed(token_id)
        if piece:
            write(piece)
    rest = stream.finish()
    if rest:
        write(rest)
    return new_ids


def run(args, out):
    check_args(args)
    model = load_model(args)
    tokenizer = choose_tokenizer(args, model.cfg.vocab_size)
    rng = np.random.default_rng(args.seed)

    def write(piece):
        out.write(piece)
        out.flush()

    def answer(prompt):
        stream_completion(model, tokenizer, prompt, write, args.max_new_tokens, args.temperature,
                          args.top_k, rng)
        write("\n")

    if not args.interactive:
        text = args.prompt if args.prompt is not None else args.instruction
        answer(prompt_text(text, args.prompt_style, raw=args.prompt is not None, input_text=args.input))
        return 0
    show_marker = sys.stdin.isatty()   # "> " goes to stderr, and only for a person: stdout is only text
    while True:
        if show_marker:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().rstrip("\r\n")
        if not line.strip() or line.strip().lower() in QUIT_WORDS:   # EOF reads as ""
            return 0
        answer(prompt_text(line, args.prompt_style, raw=args.raw))


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
