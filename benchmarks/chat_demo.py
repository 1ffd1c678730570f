"""Show that a model trained on conversations reads them: it answers requests about earlier answers. Prints
figures; not a test.

    python benchmarks/chat_demo.py                  # train (a few minutes on two cores), then measure
    python benchmarks/chat_demo.py --steps 400      # shorter; figures in docs/chat.md

One fine-tuning run, the pipeline of `train.py` (minigpt/pipeline/sft_run.py), trains a small GPT from
scratch on a mix of single-turn tasks, the three kinds a conversation opens with (reverse, sort,
uppercase), and the `chat` conversations (minigpt/tasks.py), half and half, in the chat template with the
loss on the replies alone:

    user "Reverse\\nqxbf" -> "fbxq";  user "Uppercase it" -> "FBXQ";  user "How many letters?" -> "4"

Then it answers the last request of every held-out test conversation twice, greedily:
  - with the conversation: the history as it was, then the request (the run's own test responses);
  - without it: the request alone, as if it opened the conversation.
"Uppercase it" alone names no word, so without the conversation nothing can answer it but by chance. The
chance level is the best a reader of the request alone can do: always give each request's most frequent
answer ("4" to "How many letters?"; a word is never frequent). Goals (issue 21): with the conversation
>= 95% exact match on the requests about earlier answers; without it, within 5 points of chance. Every
figure goes to chat-demo.json in the run folder, with the equivalent train.py command.
"""
import argparse
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WITH_GOAL = 0.95             # issue 21: the requests about earlier answers, read in their conversation ...
NEAR_CHANCE_POINTS = 5.0     # ... and without it, no better than chance by more than this
# The recipe (docs/chat.md: how it was chosen)
STEPS, BATCH_SIZE = 2000, 32
SINGLE_KINDS = ("reverse", "sort", "uppercase")   # the single-turn kinds: those a conversation opens with
CHAT_WEIGHT = 3              # conversations are drawn 3 times as often as each single kind: half the data
CONTEXT = 176                # the longest conversation, three exchanges in the chat template, is 169 bytes
N_TEST, N_VAL = 1000, 250    # the test prompts of the default kinds (600 of the three), 200 conversations
# The test responses' length is train.py's default, 16 tokens: the longest reply, 5 letters and <|end|>, is 12


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"(default {BATCH_SIZE})")
    parser.add_argument("--chat-weight", type=int, default=CHAT_WEIGHT,
                        help=f"conversations are drawn this many times as often as each single-turn kind "
                             f"(default {CHAT_WEIGHT})")
    parser.add_argument("--n-test", type=int, default=N_TEST,
                        help=f"test prompts of the default kinds; conversations: a fifth (default {N_TEST})")
    parser.add_argument("--model-flags", default="", help="more train.py flags for the model, e.g. "
                                                          "'--emb-dim 16 --n-layers 1' (a tiny test)")
    parser.add_argument("--out-dir", help="the run's folder (default: runs/chat-demo-<date>-<time>)")
    return parser.parse_args(argv)


def demo_flags(args, tasks):
    """The train.py flags of the demonstration's run."""
    out_dir = args.out_dir or f"runs/chat-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    data = f"{tasks.DATA_PREFIX}{','.join(SINGLE_KINDS)},chat*{args.chat_weight}"
    return ["--data", data, "--prompt-style", "chat", "--context-length", str(CONTEXT),
            "--n-train", str(args.steps * args.batch_size), "--epochs", "1",
            "--batch-size", str(args.batch_size),
            "--n-test", str(args.n_test), "--n-val", str(N_VAL),
            *shlex.split(args.model_flags), "--out-dir", out_dir]


def without_history(entry):
    """The conversation's last request alone, with its expected reply: the turns before it removed."""
    return dict(entry, messages=entry["messages"][-2:])


def scores_by_request(entries, responses):
    """{request: exact-match rate} of the responses to the conversations' last requests."""
    hits = {}
    for entry, response in zip(entries, responses, strict=True):
        hits.setdefault(entry["follow_up"], []).append(response.strip() == entry["messages"][-1]["content"])
    return {request: sum(h) / len(h) for request, h in sorted(hits.items())}


def chance_by_request(entries):
    """{request: the share of its most frequent expected reply}: a reader of the request alone at best."""
    replies = {}
    for entry in entries:
        replies.setdefault(entry["follow_up"], []).append(entry["messages"][-1]["content"])
    return {request: Counter(r).most_common(1)[0][1] / len(r) for request, r in sorted(replies.items())}


def overall(rates, entries):
    """The rate over all conversations from per-request rates (weighted by how many each has)."""
    counts = Counter(entry["follow_up"] for entry in entries)
    return sum(rates[request] * n for request, n in counts.items()) / sum(counts.values())


def report(metrics, with_rates, without_rates, chance, conversations, seconds, command, sample):
    """The figures as lines of text, and as a dict for chat-demo.json."""
    counts = Counter(entry["follow_up"] for entry in conversations)
    figures = {"with": overall(with_rates, conversations), "without": overall(without_rates, conversations),
               "chance": overall(chance, conversations)}
    goals = {"with": figures["with"] >= WITH_GOAL,
             "without": 100 * (figures["without"] - figures["chance"]) <= NEAR_CHANCE_POINTS}
    lines = [f"chat demonstration: {len(conversations)} held-out conversations, their last request answered",
             f"{'request':<18} {'count':>5} {'with':>7} {'without':>8} {'chance':>7}"]
    for request in with_rates:
        lines.append(f"{request:<18} {counts[request]:>5} {with_rates[request]:>7.1%} "
                     f"{without_rates[request]:>8.1%} {chance[request]:>7.1%}")
    lines += [f"{'all':<18} {len(conversations):>5} {figures['with']:>7.1%} {figures['without']:>8.1%} "
              f"{figures['chance']:>7.1%}",
              f"with the conversation: {figures['with']:.1%} (goal >= {WITH_GOAL:.0%}: "
              f"{'met' if goals['with'] else 'MISSED'}); without it: {figures['without']:.1%} against chance "
              f"{figures['chance']:.1%} (goal: within {NEAR_CHANCE_POINTS:g} points: "
              f"{'met' if goals['without'] else 'MISSED'})",
              "single-turn kinds: " + ", ".join(f"{kind} {rate:.1%}" for kind, rate in
                                                metrics["exact_match_by_task"].items() if kind != "chat"),
              f"for example: {sample}",
              f"time: {seconds['wall'] / 60:.1f} min wall, {seconds['cpu'] / 60:.1f} min CPU (all threads) "
              f"for the run ({metrics['steps']} steps, test responses, files) and the answers alone",
              f"equivalent: {command}",
              "goals: all met" if all(goals.values()) else "goals: MISSED"]
    summary = {"conversations": len(conversations), "counts": dict(counts), "with": with_rates,
               "without": without_rates, "chance": chance, "overall": figures, "goals_met": goals,
               "single_turn": {k: v for k, v in metrics["exact_match_by_task"].items() if k != "chat"},
               "steps": metrics["steps"], "seconds": seconds, "command": command}
    return lines, summary


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))   # this checkout's minigpt
    import train
    from minigpt import tasks
    from minigpt.files.fileio import write_json
    from minigpt.files.weights import load_weights
    from minigpt.pipeline.responses import generate_responses
    from minigpt.tokenizer import get_tokenizer
    flags = demo_flags(args, tasks)
    command = shlex.join(["python", "train.py", *flags])
    start, start_cpu = time.monotonic(), time.process_time()
    if train.main(flags) != 0:
        return 2
    run_dir = Path(flags[flags.index("--out-dir") + 1])
    answered = json.loads((run_dir / "test-responses.json").read_text())
    conversations = [entry for entry in answered if "messages" in entry]
    config = json.loads((run_dir / "config.json").read_text())
    model = load_weights(run_dir / "model-final.npz")
    alone = generate_responses(model, get_tokenizer(config["tokenizer"]),
                               [without_history(entry) for entry in conversations],
                               config["prompt_style"], config["max_new_tokens"], progress=False)
    seconds = {"wall": time.monotonic() - start, "cpu": time.process_time() - start_cpu}
    with_rates = scores_by_request(conversations, [entry["model_response"] for entry in conversations])
    without_rates = scores_by_request(conversations, alone)
    first = conversations[0]
    sample = (" / ".join(f"{m['content']!r}" for m in first["messages"][:-1]) +
              f" -> {first['model_response']!r}; alone: {first['messages'][-2]['content']!r} -> {alone[0]!r}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    lines, summary = report(metrics, with_rates, without_rates, chance_by_request(conversations),
                            conversations, seconds, command, sample)
    print("\n" + "\n".join(lines))
    write_json(run_dir / "chat-demo.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
