"""Score a model on a multiple-choice benchmark by log-likelihood: `python -m minigpt.evaluate benchmark`.

    python -m minigpt.evaluate benchmark tasks runs/NAME                  # the built-in tasks, cloze + letter
    python -m minigpt.evaluate benchmark tasks runs/NAME --before         # the run's model before training
    python -m minigpt.evaluate benchmark mmlu --model gpt2-small --format cloze
    python -m minigpt.evaluate benchmark hellaswag --model gpt2-small --format harness,llmc
    python -m minigpt.evaluate benchmark mmlu model.npz --data FOLDER --shots 5 --out mmlu.json

The model: a run folder (its model-final.npz, tokenizer and prompt style; with --before the model it
started from: the same random weights, drawn from its seed, for a model trained from scratch), a
weights file, or --model NAME (OpenAI's GPT-2, downloaded once). The data: MMLU and HellaSwag are
downloaded once into --data-dir, or read from --data in their original layouts (evaluate/mmlu.py,
evaluate/hellaswag.py); the tasks are the run's own test prompts (evaluate/task_choices.py).

Prints, per format, accuracy in each convention (evaluate/multiple_choice.py) per group and overall,
beside chance and the range a guesser scores 95% of the time. Writes JSON to --out, or into the run
folder as benchmark-NAME-FORMATS-Kshot[-before].json, where the run's report.md then lists it.
"""
import time
from pathlib import Path

from .. import tasks
from ..files.fileio import parse_json, write_json
from ..files.weights import HUB_REPOS, load_weights, pretrained_gpt2
from ..model import GPTModel
from ..pipeline import report, steps
from ..pipeline.sft_run import new_model_config
from ..prompts import PROMPT_STYLES
from ..tokenizer import TOKENIZERS, VOCAB_SIZES, tokenizer_for
from . import hellaswag, mmlu, task_choices
from .multiple_choice import CONVENTIONS, score_questions, summarize

BENCHMARKS = {  # name -> (formats, the default ones)
    "tasks": (task_choices.FORMATS, task_choices.FORMATS),
    "mmlu": (mmlu.FORMATS, ("letter",)),
    "hellaswag": (hellaswag.FORMATS, ("harness",)),
}
FINAL_WEIGHTS = "model-final.npz"


def add_arguments(parser):
    parser.add_argument("benchmark", choices=list(BENCHMARKS), help="tasks (built in), mmlu or hellaswag")
    parser.add_argument("source", nargs="?", metavar="RUN_OR_WEIGHTS",
                        help="a run folder or a weights file (.npz, .safetensors, a Hugging Face folder)")
    parser.add_argument("--model", choices=list(HUB_REPOS), help="OpenAI's GPT-2 instead, downloaded once")
    parser.add_argument("--before", action="store_true",
                        help="with a run folder: score the model the run started from (for a model trained "
                             "from scratch, its random weights at step 0, redrawn from the run's seed)")
    parser.add_argument("--format", metavar="F[,F]", help=", ".join(
        f"{name}: {'/'.join(formats)} (default {','.join(default)})" for name, (formats, default) in
        BENCHMARKS.items()))
    parser.add_argument("--shots", type=int, default=0, metavar="K",
                        help="solved examples before each question, 0-5 (MMLU: from its dev split; tasks: "
                             "from the validation split; HellaSwag: 0 only) (default: 0)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N questions")
    parser.add_argument("--data", metavar="PATH",
                        help="local data instead of the download: MMLU's folder with dev/ and test/, "
                             "HellaSwag's .jsonl")
    parser.add_argument("--data-dir", default="data",
                        help="where downloads (data, GPT-2 weights) are kept (default: %(default)s)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS,
                        help="default: the run's; else gpt2 or byte by the model's vocabulary size")
    parser.add_argument("--vocab-dir", metavar="DIR", help="folder with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--prompt-style", choices=list(PROMPT_STYLES),
                        help="tasks cloze: the prompt template (default: the run's, else phi3)")
    parser.add_argument("--separate-rows", action="store_true",
                        help="score each choice as its own row instead of sharing the context's forward "
                             "pass (the same numbers; for timing)")
    parser.add_argument("--out", metavar="PATH", help="write the results as JSON here")


def run(args, log=print):
    """Score as `args` say (see add_arguments); returns the exit code, 0."""
    formats = check_args(args)
    run_dir, settings = _run_folder(args.source)
    model, label = load_model(args, run_dir, settings)
    tokenizer = tokenizer_for(model.cfg.vocab_size, args.tokenizer or settings.get("tokenizer"),
                              args.vocab_dir or settings.get("vocab_dir"))
    style = args.prompt_style or settings.get("prompt_style") or "phi3"
    log(steps.model_line(label, model, tokenizer.name))
    results = {}
    for form in formats:
        questions = load_questions(args.benchmark, form, args.shots, args.data, args.data_dir, style,
                                   settings)
        total = len(questions)
        questions = questions[:args.limit] if args.limit else questions
        scores = score_questions(model, tokenizer, questions, share_context=not args.separate_rows)
        results[form] = summarize(questions, scores)
        log(format_table(args.benchmark, form, args.shots, results[form], total))
    record = {"benchmark": args.benchmark, "model": label, "shots": args.shots, "formats": results,
              "conventions": CONVENTIONS, "date": time.strftime("%Y-%m-%d %H:%M")}
    name = (f"benchmark-{args.benchmark}-{'+'.join(formats)}-{args.shots}shot"
            f"{'-before' if args.before else ''}")
    out = args.out or (run_dir / f"{name}.json" if run_dir else None)
    if out is None:
        log("(results not written: give --out PATH to keep them)")
        return 0
    write_json(out, record)
    log(f"results written to {out}")
    if run_dir and Path(out).parent.resolve() == run_dir.resolve():
        report.add_results(run_dir)
    return 0


def check_args(args):
    """The formats asked for; ValueError (one line) for a bad combination."""
    if (args.source is None) == (args.model is None):
        raise ValueError("give a run folder or weights file, or --model NAME (one of them)")
    if args.before and (args.source is None or not Path(args.source).is_dir()
                        or not (Path(args.source) / "config.json").is_file()):
        raise ValueError("--before needs a run folder (it reads the run's config.json)")
    known, default = BENCHMARKS[args.benchmark]
    formats = tuple(dict.fromkeys(args.format.split(","))) if args.format else default
    unknown = [form for form in formats if form not in known]
    if unknown:
        raise ValueError(f"{args.benchmark} has no format {', '.join(unknown)}; "
                         f"choose from {', '.join(known)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if not 0 <= args.shots <= mmlu.MAX_SHOTS:
        raise ValueError(f"--shots must be 0 to {mmlu.MAX_SHOTS}, got {args.shots}")
    return formats


def _run_folder(source):
    """(the run folder, its config.json's settings) if `source` is a run folder, else (None, {})."""
    path = Path(source or "") / "config.json"
    if source is not None and path.is_file():
        return Path(source), parse_json(path.read_bytes(), path)
    return None, {}


def load_model(args, run_dir, settings):
    """(model, label): the run's final or starting model, a weights file's, or --model's."""
    if args.model:
        return pretrained_gpt2(args.model, args.data_dir), args.model
    if run_dir is None:
        return load_weights(args.source), str(args.source)
    if not args.before:
        return load_weights(run_dir / FINAL_WEIGHTS), str(run_dir / FINAL_WEIGHTS)
    if settings.get("model") or settings.get("weights"):
        source = settings.get("model") or settings.get("weights")
        start = steps.load_model(settings.get("model"), settings.get("weights"),
                                 settings.get("data_dir", "data"))
        return start, f"{run_dir} before training ({source})"
    vocab_size = VOCAB_SIZES[settings["tokenizer"]]
    config = new_model_config(vocab_size, settings["context_length"], settings["emb_dim"],
                              settings["n_heads"], settings["n_layers"], settings["drop_rate"])
    seed = settings["seed"]
    return GPTModel(config, seed=seed), f"{run_dir} before training (random weights, seed {seed})"


def load_questions(benchmark, form, k, data, data_dir, style, settings):
    """The benchmark's Questions in `form`, after k examples each."""
    if benchmark == "mmlu":
        return mmlu.mmlu_questions(data or mmlu.mmlu_folder(data_dir), form, k)
    if benchmark == "hellaswag":
        return hellaswag.hellaswag_questions(data or hellaswag.hellaswag_file(data_dir), form, k)
    kinds = tasks.selected_kinds(settings.get("data", "tasks")) or tasks.TASKS
    _, val, test = tasks.make_task_splits(settings.get("data_seed", 0), 0, settings.get("n_val", 250),
                                          settings.get("n_test", 500), tasks=kinds)
    return task_choices.task_questions(test, form, style, k, val)


def format_table(benchmark, form, k, result, total):
    """The printed table of one format: accuracy per group and overall in each convention, and chance."""
    names = list(CONVENTIONS)
    width = max([len(g) for g in result["groups"]] + [len("all")])
    header = f"  {'':<{width}}  " + "  ".join(f"{name:>15}" for name in names) + "  questions"

    def line(name, figures):
        return (f"  {name:<{width}}  " + "  ".join(f"{figures[c]:>15.4f}" for c in names)
                + f"  {figures['questions']:>9}")
    lines = [f"{benchmark}, {form}, {k}-shot: {result['questions']} questions"
             + (f" (the first of {total})" if total > result["questions"] else ""), header]
    if len(result["groups"]) > 1:
        lines += [line(group, figures) for group, figures in result["groups"].items()]
    lines.append(line("all", result))
    low, high = result["chance_95"]
    lines.append(f"  chance {result['chance']:.4f}: a guesser scores {low:.4f} to {high:.4f} 95% of the "
                 f"time; "
                 f"{result['contexts_cut']} contexts cut to fit; {result['seconds']:.1f} s, "
                 f"{result['questions'] / max(result['seconds'], 1e-9):.1f} questions/s")
    return "\n".join(lines)
