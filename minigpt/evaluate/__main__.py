"""Score model responses against the expected outputs: ROUGE-L, exact match, optional LLM judge.

    python -m minigpt.evaluate RESPONSES.json [--judge-model llama3] [--out metrics.json]
    python -m minigpt.evaluate benchmark tasks|mmlu|hellaswag RUN_OR_WEIGHTS ...   (evaluate/benchmark.py)
    python -m minigpt.evaluate compare A B --judge-model llama3 ...             (evaluate/compare.py)

RESPONSES.json is a JSON list of entries with "output" (expected) and "model_response" (generated),
plus "instruction" and "input" for the judge. The offline scores need nothing but this file; the
judge (rasbt ch. 7, section 7.8) asks a model served by a local Ollama server for a 0-100 score.
`benchmark` scores a model on multiple-choice questions by log-likelihood; `compare` asks the judge
which of two models' responses is better. Every error is one `error: ...` line, exit code 2.
"""
import argparse
import sys

from ..data import load_json_entries
from ..files.fileio import write_json
from . import benchmark, compare
from .judge import (DEFAULT_JUDGE_TIMEOUT, DEFAULT_OLLAMA_URL, JUDGE_KEYS, JudgeUnavailable, judge_responses,
                    positive_seconds)
from .scores import RESPONSE_KEYS, score_responses


class UsageError(Exception):
    """A bad command line; main prints it as one `error: ...` line (argparse would add its usage)."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m minigpt.evaluate", description=__doc__.split("\n")[0],
                            epilog="Commands: python -m minigpt.evaluate benchmark --help, "
                                   "python -m minigpt.evaluate compare --help")
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


COMMANDS = {"benchmark": benchmark, "compare": compare}  # each: add_arguments(parser), run(args) -> exit code


def main(argv=None):
    """Print the scores of a responses file, or run a COMMAND; returns the exit code (2 for a bad file or
    command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e} (see python -m minigpt.evaluate --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code
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


def run_command(name, argv):
    """`python -m minigpt.evaluate NAME ...`: parse, run, and turn every failure into one error line."""
    module = COMMANDS[name]
    parser = ArgumentParser(prog=f"python -m minigpt.evaluate {name}",
                            description=module.__doc__.split("\n")[0])
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv)
        return module.run(args)
    except UsageError as e:
        print(f"error: {e} (see python -m minigpt.evaluate {name} --help)", file=sys.stderr)
    except SystemExit as e:  # --help
        return e.code
    except (OSError, ValueError, JudgeUnavailable) as e:  # missing files, bad data, no network or no judge
        print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
