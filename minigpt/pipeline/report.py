"""report.md: the page of a run folder a person reads first.

    report.write_report(run_dir, datasets, seconds)   # the last step of a run (sft_run.py, dpo_run.py)
    report.add_results(run_dir)                        # after `python -m minigpt.evaluate benchmark ...` or
                                                       # `... compare` wrote its results into the folder

The page is made from the folder's files (config.json, metrics.json, history.json, loss-plot.png,
test-responses.json) and two things only the run knows: its datasets, to count what the cut at the
context length took, and its wall time (of the process that finished it: after a resume, since the
resume). In order: what ran, when, how long and on which machine; the settings that matter; the data
and the cut; the loss plot and the losses; the test scores, per task kind where entries have one; a
few right and a few wrong test responses beside the expected answer. Below a fixed line, RESULTS_MARK,
follow the benchmark-*.json and comparison-*.json results in the folder: add_results rewrites that part
alone, so the run's own part stays as the run wrote it. Written atomically.
"""
import collections
import os
import platform
import time
from pathlib import Path

import numpy as np

from ..data import InstructionDataset, expected_reply
from ..evaluate.scores import exact_match, rouge_l_f1
from ..files.fileio import atomic_write, parse_json
from ..training import format_duration
from .settings import METHOD_SETTINGS

REPORT_NAME = "report.md"
RESULTS_MARK = "<!-- Benchmark and comparison results below; python -m minigpt.evaluate rewrites them. -->"
EXAMPLES = 3          # right and wrong test responses shown, each
CELL_CHARACTERS = 80  # a longer prompt or response is shortened to this in the examples
MAX_GROUPS = 10       # a benchmark's groups are listed up to this many: the task kinds, not MMLU's subjects
METHODS = {"sft": "Instruction fine-tuning", "dpo": "Preference tuning (DPO)"}


def write_report(run_dir, datasets=None, seconds=None, expected=expected_reply):
    """Write run_dir/report.md (see the module's doc). datasets: {"training": dataset, ...}, the run's
    InstructionDatasets or PreferenceDatasets; seconds: the run's wall time; expected(entry): the text a
    test response is scored against (default data.expected_reply; a DPO run's: the chosen response)."""
    run_dir = Path(run_dir)
    config = _read(run_dir / "config.json") or {}
    metrics = _read(run_dir / "metrics.json") or {}
    history = _read(run_dir / "history.json") or {}
    responses = _read(run_dir / "test-responses.json") or []
    parts = [_heading(run_dir, config, seconds), _settings(config), _data(datasets, responses),
             _training(run_dir, metrics, history), _test_scores(metrics),
             _examples(responses, expected)]
    _write(run_dir, "\n\n".join(part for part in parts if part) + "\n")


def add_results(run_dir):
    """Rewrite the results part of run_dir/report.md from the folder's result files (written first, with
    the run's part as far as the files tell it, for a run folder that has no report.md)."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_NAME
    if not path.is_file():
        write_report(run_dir)
    head = path.read_text(encoding="utf-8").split(RESULTS_MARK)[0].rstrip("\n")
    _write(run_dir, head + "\n")


def _write(run_dir, head):
    results = _results(run_dir)
    with atomic_write(run_dir / REPORT_NAME, "w") as f:
        f.write(head + "\n" + RESULTS_MARK + "\n" + (f"\n{results}\n" if results else ""))


def _read(path):
    return parse_json(path.read_bytes(), path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# The run's part

def machine():
    """'Intel Xeon ..., 2 cores, Linux 6.1, Python 3.11.7, NumPy 2.4.6'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, NumPy {np.__version__}")


def _heading(run_dir, config, seconds):
    method = METHODS.get(config.get("method"), "A run")
    start = config.get("model") or config.get("weights") or "a new model (random weights)"
    when = (f"finished {time.strftime('%Y-%m-%d %H:%M')}, took {format_duration(seconds)}, on {machine()}"
            if seconds is not None else "this page was made afterwards from the folder's files")
    return f"# {run_dir.name}\n\n{method} of {start} on {config.get('data', '?')}: {when}."


def _settings(config):
    if not config:
        return None
    value = collections.defaultdict(lambda: "?", config)  # a key an older config.json lacks reads as "?"
    masked = "masked" if config.get("mask_prompt") else "not masked"
    rows = [("tokenizer", value["tokenizer"]), ("prompts", f"{value['prompt_style']}, prompt {masked}")]
    if not (config.get("model") or config.get("weights")):
        rows.append(("new model", "emb {emb_dim}, {n_layers} layers, {n_heads} heads, context "
                                  "{context_length}".format_map(value)))
    training = ("{epochs} epoch(s), batch {batch_size}, AdamW lr {lr} ({schedule}, warm-up {warmup_steps} "
                "steps), weight decay {weight_decay}, grad clip {grad_clip}")
    rows += [("training", training.format_map(value)),
             ("allowed max length", "{allowed_max_length} tokens (or the model's context, if shorter)"
                                    .format_map(value)),
             ("seed", "{seed} (data seed {data_seed})".format_map(value))]
    if config.get("lora_rank"):
        rows.append(("LoRA", "rank {lora_rank}, alpha {lora_alpha}".format_map(value)))
    rows += [(name, value[name]) for name in METHOD_SETTINGS if value.get(name) is not None]  # a method's
    return "## Settings\n\n" + _table(("setting", "value"), rows) + "\n\nEvery setting: config.json."


def _data(datasets, responses):
    rows = [(name, *_cut_counts(dataset)) for name, dataset in (datasets or {}).items()]
    if responses:
        rows.append(("test", len(responses), "answered in full", ""))
    if not rows:
        return None
    cut = next(iter(datasets.values())).allowed_max_length if datasets else None
    header = ("split", "examples", f"shortened by the cut at {cut} tokens", "of them, left with no response")
    return "## Data\n\n" + _table(header, rows)


def _cut_counts(dataset):
    """(examples, how many the cut at the context shortens, how many of those it leaves no response) of
    an InstructionDataset, or of a PreferenceDataset's pairs (those it left out for a prompt longer than
    the cut are the last)."""
    cut = dataset.allowed_max_length
    if isinstance(dataset, InstructionDataset):
        n = len(dataset)
        shortened = sum(len(ids) > cut for ids in dataset.token_ids) if cut else 0
        lost = sum(length > cut for length in dataset.prompt_lengths) if cut else 0
    else:
        n, lost = len(dataset) + dataset.left_out, dataset.left_out
        shortened = lost + (sum(max(len(c), len(r)) > cut for c, r in zip(dataset.chosen, dataset.rejected))
                            if cut else 0)
    return n, f"{shortened} ({shortened / max(n, 1):.1%})", lost


def _training(run_dir, metrics, history):
    if not metrics:
        return None
    lines = ["## Training", ""]
    if (run_dir / "loss-plot.png").is_file():
        lines += ["![loss plot](loss-plot.png)", ""]
    final_train = (history.get("train_loss") or [None])[-1]
    stopped = " (stopped early)" if metrics.get("stopped_early") else ""
    lines.append(f"{metrics.get('steps')} steps, {metrics.get('tokens_seen', 0):,} tokens seen. Final "
                 f"losses: train {_number(final_train)}, validation "
                 f"{_number(metrics.get('final_val_loss'))}; "
                 f"best validation loss {_number(metrics.get('best_val_loss'))} at step "
                 f"{metrics.get('best_step')}{stopped}.")
    test_pairs = (metrics.get("dpo") or {}).get("test")
    if test_pairs:
        lines.append(f"Test pairs: DPO loss {_number(test_pairs.get('dpo_loss', test_pairs.get('loss')))}, "
                     f"reward margin {_number(test_pairs.get('reward_margin'))}, "
                     f"reward accuracy {_number(test_pairs.get('reward_accuracy'))}.")
    return "\n".join(lines)


def _test_scores(metrics):
    if "exact_match" not in metrics:
        return None
    judge = metrics.get("judge") or {}
    judged = (f"; judge ({judge['model']}) {judge['mean_score']:.1f} / 100 over {judge['scored']} responses"
              if judge.get("mean_score") is not None else "")
    lines = ["## Test responses", "", f"{metrics['count']} responses: exact match "
             f"{metrics['exact_match']:.1%}, ROUGE-L F1 {metrics['rouge_l_f1']:.3f}{judged}."]
    by_task = metrics.get("exact_match_by_task") or {}
    if by_task:
        rows = [(kind, f"{rate:.1%}") for kind, rate in by_task.items()]
        lines += ["", _table(("task kind", "exact match"), rows)]
    return "\n".join(lines)


def _prompt_of(entry):
    """The request a test response answers, shortened: the instruction and input, or a conversation's
    last user message."""
    if "messages" in entry:
        return [m["content"] for m in entry["messages"] if m["role"] == "user"][-1]
    return " / ".join(filter(None, (entry.get("instruction"), entry.get("input"))))


def _examples(responses, expected):
    """A few right and a few wrong responses (by exact match; the best and worst by ROUGE-L when none is
    right, as for free text), in the file's order; expected(entry) is the text each is scored against."""
    if not responses:
        return None
    right = [e for e in responses if exact_match(e["model_response"], expected(e))]
    wrong = [e for e in responses if not exact_match(e["model_response"], expected(e))]
    sections = []
    right_title = f"Right ({len(right)} of {len(responses)})"
    if not right:
        wrong.sort(key=lambda e: rouge_l_f1(e["model_response"], expected(e)), reverse=True)
        right, wrong, right_title = wrong[:EXAMPLES], wrong[::-1], "Closest (no exact match; by ROUGE-L)"
    for title, entries in ((right_title, right), (f"Wrong ({len(wrong)} of {len(responses)})", wrong)):
        if entries:
            rows = [(_shortened(_prompt_of(e)), _shortened(expected(e)), _shortened(e["model_response"]))
                    for e in entries[:EXAMPLES]]
            sections.append(f"### {title}\n\n" + _table(("prompt", "expected", "response"), rows))
    return "## Examples\n\n" + "\n\n".join(sections)


# ---------------------------------------------------------------------------------------------
# The results part

def _results(run_dir):
    parts = []
    benchmarks = [_read(path) for path in sorted(run_dir.glob("benchmark-*.json"))]
    if benchmarks:
        parts.append("## Benchmarks (log-likelihood; docs/evaluation.md)\n\n" + "\n\n".join(
            _benchmark(record) for record in benchmarks))
    comparisons = [_read(path) for path in sorted(run_dir.glob("comparison-*.json"))]
    if comparisons:
        parts.append("## Side by side (an LLM judge; docs/evaluation.md)\n\n" + "\n\n".join(
            _comparison(record) for record in comparisons))
    return "\n\n".join(parts)


def _benchmark(record):
    rows = []
    for form, result in record["formats"].items():
        low, high = result["chance_95"]
        groups = result["groups"] if 1 < len(result["groups"]) <= MAX_GROUPS else {}
        for name, figures in [("all", result), *groups.items()]:
            rows.append((form, name, figures["questions"], *(f"{figures[c]:.3f}" for c in
                                                             ("acc", "acc_norm_chars", "acc_norm_tokens")),
                         f"{result['chance']:.3f} ({low:.3f}-{high:.3f})" if name == "all" else ""))
    return (f"{record['benchmark']}, {record['shots']}-shot, {record['model']} ({record['date']}):\n\n"
            + _table(("format", "group", "questions", "acc", "acc_norm_chars", "acc_norm_tokens",
                      "chance (a guesser's 95% range)"), rows))


def _comparison(record):
    rate, (low, high), first = record["win_rate"], record["win_rate_95"], record["first_position_rate"]
    incomplete = "" if record["complete"] else " (incomplete: the judge stopped answering)"
    interval = f" (95% {low:.3f}-{high:.3f})" if rate is not None else ""
    position = "" if first is None else f"; the judge picked the response shown first {first:.1%} of the time"
    return (f"{record['model_1']} vs {record['model_2']}, judge {record['judge']} ({record['date']}): "
            f"{record['wins']} wins / {record['ties']} ties / {record['losses']} losses, "
            f"{record['undecided']} undecided, of {record['pairs']} pairs{incomplete}; model 1's win rate "
            f"{_number(rate)}{interval}"
            f"{position}.")


# ---------------------------------------------------------------------------------------------
# Markdown

def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value):
    return str(value).replace("\n", " ⏎ ").replace("|", "\\|")


def _shortened(text):
    return text if len(text) <= CELL_CHARACTERS else text[:CELL_CHARACTERS - 1] + "…"


def _number(value):
    return "n/a" if value is None else f"{value:.3f}"
