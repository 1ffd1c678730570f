"""Two models judged side by side, as AlpacaEval and MT-Bench's pairwise mode do it (`... compare`).

    python -m minigpt.evaluate compare runs/A runs/B --judge-model llama3          # two runs' test responses
    python -m minigpt.evaluate compare a.json b.json --judge-model llama3          # two responses files
    python -m minigpt.evaluate compare eval-example-data.json --judge-model llama3  # rasbt's layout

The inputs: two responses files for the same test entries, matched by position (a run folder stands for
its test-responses.json; each entry's instruction, input and expected output must agree), or one file in
the layout of rasbt's ch07/03_model-evaluation, each entry holding "model 1 response" and "model 2
response". A judge served by a local Ollama server (judge.ask_ollama: greedy, seeded, one deadline per
request) is shown each pair twice, the order swapped, since LLM judges favour a position:

    both orders pick the same model's response    a win for that model
    the orders disagree                           a tie: the judge followed the position, not the text
    both models wrote the same text               a tie, without asking
    a reply names neither A nor B                 undecided: left out, with a warning (as the 0-100 judge
                                                  leaves an unparsable score out)

Model 1's win rate is (wins + ties / 2) / decided pairs (AlpacaEval counts a tie as half), with a 95%
bootstrap interval: the decided pairs resampled with replacement BOOTSTRAP_SAMPLES times, the 2.5th and
97.5th percentiles of the resampled win rates. The first-position rate is the share of the judge's
verdicts that picked the response shown first: 0.5 is no position bias. A server that stops answering
midway ends the comparison with the pairs judged so far, written and marked incomplete (exit code 1);
one that never answers is an error. The results go to --out, or into model 1's run folder as
comparison-NAME2.json, which its report.md then lists.
"""
import re
import sys
import time
from pathlib import Path

import numpy as np

from ..data import load_json_entries
from ..files.fileio import write_json
from ..pipeline import report
from ..prompts import format_input
from .judge import (DEFAULT_JUDGE_TIMEOUT, DEFAULT_OLLAMA_URL, JUDGE_KEYS, JudgeUnavailable, ask_ollama,
                    positive_seconds)

PAIR_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, which of two responses is better?\n"
               "Response A: `{first}`\nResponse B: `{second}`\n"
               "Respond with the single letter A or B only.")
MODEL_KEYS = ("model 1 response", "model 2 response")   # rasbt's eval-example-data.json
RESPONSES_NAME = "test-responses.json"                   # a run folder's responses
BOOTSTRAP_SAMPLES = 2000
OUTCOME_SCORES = {"model 1": 1.0, "tie": 0.5, "model 2": 0.0}


def add_arguments(parser):
    parser.add_argument("first", metavar="A", help="model 1: a run folder or a responses file (or one "
                        "file holding 'model 1 response' and 'model 2 response')")
    parser.add_argument("second", metavar="B", nargs="?", help="model 2: a run folder or a responses file")
    parser.add_argument("--judge-model", required=True, metavar="NAME",
                        help="the Ollama model judging, e.g. llama3")
    parser.add_argument("--ollama-url", default=DEFAULT_OLLAMA_URL, metavar="URL",
                        help=f"address of the Ollama server (default: {DEFAULT_OLLAMA_URL})")
    parser.add_argument("--judge-timeout", default=DEFAULT_JUDGE_TIMEOUT, type=positive_seconds,
                        metavar="SECONDS",
                        help=f"longest wait for one reply (default: {DEFAULT_JUDGE_TIMEOUT:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    parser.add_argument("--out", metavar="PATH", help="write the results as JSON here")


def run(args, log=print):
    """Compare as `args` say; returns the exit code: 0, or 1 when the judge stopped answering midway."""
    entries, names, run_dir = load_pairs(args.first, args.second)
    log(f"model 1: {names[0]}, model 2: {names[1]}; {len(entries)} pairs, each shown to the judge "
        f"({args.judge_model}) twice, the order swapped")
    result = compare_responses(entries, args.judge_model, args.ollama_url, args.judge_timeout, args.seed)
    result.update(model_1=names[0], model_2=names[1], date=time.strftime("%Y-%m-%d %H:%M"))
    log(format_result(result))
    out = args.out or (run_dir / f"comparison-{Path(names[1]).stem}.json" if run_dir else None)
    if out is not None:
        write_json(out, result)
        log(f"results written to {out}")
        if run_dir and Path(out).parent.resolve() == run_dir.resolve():
            report.add_results(run_dir)
    return 0 if result["complete"] else 1


def load_pairs(first, second=None):
    """(entries with "model 1 response" and "model 2 response", (name 1, name 2), model 1's run folder)."""
    if second is None:
        entries = load_json_entries(first, ("instruction", "output", *MODEL_KEYS), what="comparison")
        return entries, ("model 1", "model 2"), None
    sides = [_responses_of(path) for path in (first, second)]
    (one, name_1, run_dir), (two, name_2, _) = sides
    if len(one) != len(two):
        raise ValueError(f"{name_1} has {len(one)} responses and {name_2} {len(two)}: compare responses to "
                         f"the same test entries")
    for i, (a, b) in enumerate(zip(one, two)):
        if any(a.get(key, "") != b.get(key, "") for key in ("instruction", "input", "output")):
            raise ValueError(f"entry {i} differs between {name_1} and {name_2} (instruction, input or "
                             f"expected output): compare responses to the same test entries, in the same "
                             f"order")
    entries = [dict(a, **{MODEL_KEYS[0]: a["model_response"], MODEL_KEYS[1]: b["model_response"]})
               for a, b in zip(one, two)]
    return entries, (name_1, name_2), run_dir


def _responses_of(path):
    """(entries, a name, the run folder or None) of a run folder or a responses file."""
    path = Path(path)
    run_dir = path if path.is_dir() else None
    entries = load_json_entries(path / RESPONSES_NAME if run_dir else path, JUDGE_KEYS, what="responses")
    return entries, str(path), run_dir


def pair_prompt(entry, first, second):
    return PAIR_PROMPT.format(prompt=format_input(entry), output=entry["output"], first=first, second=second)


def parse_verdict(reply):
    """'A' or 'B' from the judge's reply: the whole reply is that letter (markup and punctuation aside,
    either case), or it names exactly one of "Response A" and "Response B"; else None (no verdict)."""
    if not isinstance(reply, str):
        return None
    bare = reply.strip().strip("*[](){}.:;!'\"` \n").upper()
    if bare in ("A", "B"):
        return bare
    named = set(re.findall(r"\bresponse\s+([AB])\b", reply, flags=re.IGNORECASE))
    return named.pop().upper() if len(named) == 1 else None


def judge_pair(entry, model, url, timeout):
    """The judge's verdicts on one pair, model 1's response first and then model 2's first ('A', 'B' or
    None each), and its decision: "model 1", "model 2", "tie" or "undecided"."""
    one, two = entry[MODEL_KEYS[0]], entry[MODEL_KEYS[1]]
    if one.strip() == two.strip():
        return (None, None), "tie"
    verdicts = tuple(parse_verdict(ask_ollama(pair_prompt(entry, first, second), model, url, timeout))
                     for first, second in ((one, two), (two, one)))
    if None in verdicts:
        return verdicts, "undecided"
    winners = ("model 1" if verdicts[0] == "A" else "model 2", "model 2" if verdicts[1] == "A" else "model 1")
    return verdicts, winners[0] if winners[0] == winners[1] else "tie"


def compare_responses(entries, model="llama3", url=DEFAULT_OLLAMA_URL, timeout=DEFAULT_JUDGE_TIMEOUT, seed=0):
    """Judge every pair (judge_pair) -> wins, ties, losses, undecided, the win rate with its bootstrap 95%
    interval, the first-position rate and each pair's record. JudgeUnavailable when the server answers
    none; when it stops midway, the pairs judged so far, with "complete" False."""
    records, complete = [], True
    for i, entry in enumerate(entries):
        try:
            verdicts, outcome = judge_pair(entry, model, url, timeout)
        except JudgeUnavailable as e:
            if not records:
                raise
            print(f"warning: the judge stopped answering at pair {i} of {len(entries)}: {e}; the results "
                  f"cover the {len(records)} pairs judged", file=sys.stderr)
            complete = False
            break
        if outcome == "undecided":
            print(f"warning: no verdict from the judge for pair {i}, left out: {verdicts}", file=sys.stderr)
        records.append({"verdicts": list(verdicts), "outcome": outcome})
    return dict(summarize(records, seed), judge=model, complete=complete, pairs=len(records),
                per_pair=records)


def summarize(records, seed=0):
    """Counts, model 1's win rate and bootstrap interval, and the judge's first-position rate."""
    counts = {outcome: sum(r["outcome"] == outcome for r in records)
              for outcome in ("model 1", "tie", "model 2", "undecided")}
    scores = np.array([OUTCOME_SCORES[r["outcome"]] for r in records if r["outcome"] in OUTCOME_SCORES])
    win_rate, interval = None, [None, None]
    if len(scores):
        win_rate = float(scores.mean())
        picks = np.random.default_rng(seed).integers(0, len(scores), (BOOTSTRAP_SAMPLES, len(scores)))
        interval = [float(q) for q in np.percentile(scores[picks].mean(axis=1), [2.5, 97.5])]  # picks (S, n)
    first_picks = [verdict == "A" for r in records for verdict in r["verdicts"] if verdict is not None]
    agreed = sum(r["outcome"] in ("model 1", "model 2") for r in records if r["verdicts"] != [None, None])
    return {"wins": counts["model 1"], "ties": counts["tie"], "losses": counts["model 2"],
            "undecided": counts["undecided"], "win_rate": win_rate, "win_rate_95": interval,
            "first_position_rate": sum(first_picks) / len(first_picks) if first_picks else None,
            "verdicts": len(first_picks), "orders_agreed": agreed}


def format_result(result):
    lines = [f"{result['pairs']} pairs{'' if result['complete'] else ' (incomplete)'}: model 1 wins "
             f"{result['wins']}, ties {result['ties']}, loses {result['losses']}; "
             f"undecided {result['undecided']}"]
    if result["win_rate"] is not None:
        low, high = result["win_rate_95"]
        lines.append(f"win rate of model 1: {result['win_rate']:.3f} (95% bootstrap interval {low:.3f} to "
                     f"{high:.3f}; a tie counts half)")
    if result["first_position_rate"] is not None:
        lines.append(f"the judge picked the response shown first in {result['first_position_rate']:.1%} "
                     f"of its {result['verdicts']} verdicts (50%: no position bias); both orders agreed on "
                     f"{result['orders_agreed']} pairs")
    return "\n".join(lines)
