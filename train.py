"""Fine-tuning (and DPO preference tuning) from the command line: argparse -> RunConfig -> the method's run.

    python train.py                              # offline: a small GPT learns the built-in tasks
    python train.py --model gpt2-medium          # rasbt's ch. 7 job: pretrained GPT-2, his 1,100 examples
    python train.py --resume runs/NAME           # continue an interrupted run exactly
    python train.py --model gpt2-small --lora-rank 16   # LoRA: train small adapters, freeze the rest
    python train.py --show-batch                 # print the first batch as the model sees it, then stop
    python train.py --method dpo --weights runs/NAME/model-final.npz --data pairs.json   # preference tuning
    python train.py --data chats.json --prompt-style chat    # conversations: the loss on the replies alone

Defaults come from minigpt/pipeline/settings.py: RunConfig (offline) and REFERENCE_RECIPE (--model /
--weights), then the method's RECIPE (minigpt/pipeline/dpo_run.py for --method dpo), then what the model
card of --weights says (its tokenizer, template and, for fine-tuning, its data). The run ends with the
command that chats with the model it made.
"""
import argparse
import dataclasses
import sys

EXIT_USAGE = 2        # bad arguments, missing files, no network
EXIT_DIVERGED = 3     # the loss or the weights stopped being finite numbers
EXIT_OUT_OF_MEMORY = 4  # memory ran out (a MemoryError) during the run; the last checkpoint is kept
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
SHOW_BATCH_ROWS = 4   # rows --show-batch prints unless told otherwise

try:  # NumPy, tiktoken and matplotlib take a second to import: Ctrl-C meanwhile is one line too
    from minigpt.files.weights import HUB_REPOS
    from minigpt.lora import DEFAULT_TARGETS
    from minigpt.pipeline import dpo_run, sft_run, steps
    from minigpt.pipeline.settings import REFERENCE_RECIPE, RESUME_OVERRIDES, RunConfig
    from minigpt.prompts import PROMPT_STYLES
    from minigpt.tasks import KINDS
    from minigpt.tokenizer import TOKENIZERS, VOCAB_DIR_ENV
    from minigpt.training import SCHEDULES, OutOfMemory, TrainingDiverged
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


# The runs, one per method: a module with RECIPE, make_config(**settings), run(config, resume) and
# show_batch(config, rows). A new method is a new module and one line here.
RUNS = {
    "sft": sft_run,   # instruction fine-tuning (rasbt's chapter 7)
    "dpo": dpo_run,   # preference tuning (DPO) of a fine-tuned model
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr and exit code 2 (argparse would print the whole usage first)."""
        self.exit(EXIT_USAGE, f"error: {message} (see python train.py --help)\n")


def defaults(name):
    """'default: X', plus the --model/--weights and the --method dpo defaults where the recipes differ."""
    offline = {field.name: field.default for field in dataclasses.fields(RunConfig)}[name]
    reference = REFERENCE_RECIPE.get(name, offline)
    preference = dpo_run.RECIPE.get(name, reference)
    text = f"default: {shown(offline)}"
    if reference != offline:
        text += f"; with --model/--weights: {shown(reference)}"
    return text if preference == reference else f"{text}; with --method dpo: {shown(preference)}"


def shown(value):
    """A default as a user reads it: none, on, off, or the value (identity checks: 0.0 == False)."""
    for constant, text in ((None, "none"), (True, "on"), (False, "off")):
        if value is constant:
            return text
    return str(value)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                            epilog=f"exit codes: 0 done; {EXIT_USAGE} bad input (one 'error:' line); "
                                   f"{EXIT_DIVERGED} training diverged (a NaN or inf loss: lower --lr or use "
                                   f"--grad-clip; the last finite checkpoint and the best weights are kept); "
                                   f"{EXIT_OUT_OF_MEMORY} out of memory (one line: what ran out, after which "
                                   f"step, what would fit; the last checkpoint is kept and resumes); "
                                   f"{EXIT_INTERRUPTED} interrupted (Ctrl-C)")

    def add(group, flag, help, **kwargs):
        name = flag[2:].replace("-", "_")
        group.add_argument(flag, help=f"{help} ({defaults(name)})", **kwargs)

    add(parser, "--method", "sft: instruction fine-tuning; dpo: preference tuning (DPO, minigpt/dpo.py) of a "
                            "fine-tuned model (--weights or --model) "
                            "on pairs of chosen and rejected responses "
                            "(--data)", choices=list(RUNS))
    add(parser, "--beta", "DPO: how strongly the policy's log-probability margins count against the "
                          "reference's, the starting model's", type=float)
    add(parser, "--nll-weight", "DPO: add this times the chosen responses' negative log-likelihood to the "
                                "loss (RPO), so that they stay likely; 0: plain DPO", type=float)
    model = parser.add_argument_group("model (trained from scratch unless --model or --weights)")
    model.add_argument("--model", choices=list(HUB_REPOS), metavar="NAME",
                       help=f"fine-tune OpenAI's pretrained GPT-2: {', '.join(HUB_REPOS)}; downloaded and "
                            f"converted once into --data-dir")
    model.add_argument("--weights", metavar="PATH",
                       help="fine-tune these weights: a .npz from minigpt, a run folder (its "
                            "model-final.npz), a .safetensors file or a Hugging Face GPT-2 folder. Its model "
                            "card (in every file minigpt writes) gives the tokenizer, the prompt style and "
                            "(for fine-tuning) the data, split as before; a contradicting --tokenizer or "
                            "--prompt-style is refused, and a file without a card needs --prompt-style")
    add(model, "--tokenizer", f"{' or '.join(TOKENIZERS)}; must match the model's vocabulary",
        choices=TOKENIZERS)
    add(model, "--vocab-dir", f"folder with GPT-2's encoder.json and vocab.bpe, to build its tokenizer "
                              f"offline (or set {VOCAB_DIR_ENV})", metavar="DIR")
    add(model, "--emb-dim", "embedding width of a new model", type=int, metavar="C")
    add(model, "--n-layers", "transformer blocks of a new model", type=int, metavar="N")
    add(model, "--n-heads", "attention heads of a new model (must divide --emb-dim)", type=int, metavar="N")
    add(model, "--context-length", "positions of a new model", type=int, metavar="T")
    add(model, "--drop-rate", "dropout probability during training", type=float, metavar="P")

    data = parser.add_argument_group("data")
    add(data, "--data", f"'tasks' (built-in checkable tasks), 'tasks:KIND,...' (a selection of "
                        f"{', '.join(KINDS)}, drawn in turn; KIND*N: N times as often; chat is "
                        f"conversations, for --prompt-style chat), 'reference' (rasbt's 1,100 examples, "
                        f"downloaded into --data-dir) or a JSON list of {{instruction, input, output}} and "
                        f"conversations {{messages: [{{role, content}}, ...]}} (docs/chat.md); with --method "
                        f"dpo, 'reference' (rasbt's preference pairs) or a JSON list of "
                        f"{{instruction, input, output, chosen, rejected}}",
        metavar="tasks|tasks:KIND,...|reference|PATH")
    add(data, "--data-dir", "where downloads and converted GPT-2 weights are cached", metavar="DIR")
    add(data, "--data-seed", "seed that generates the task dataset", type=int, metavar="N")
    add(data, "--n-train", "training examples of the task dataset", type=int, metavar="N")
    add(data, "--n-val", "validation examples of the task dataset", type=int, metavar="N")
    add(data, "--n-test", "test examples of the task dataset", type=int, metavar="N")
    add(data, "--prompt-style", "prompt template: alpaca and phi3 hold one exchange, chat any number of "
                                "turns (minigpt/prompts.py)", choices=list(PROMPT_STYLES))
    add(data, "--mask-prompt", "take the loss on the response tokens only (in a conversation: every "
                               "reply and its end marker)",
        action=argparse.BooleanOptionalAction)
    add(data, "--shuffle-seed", "shuffle a JSON dataset with this seed before the 85%% train / 5%% "
                                "validation / 10%% test split (none: split in file order, like the "
                                "reference)", type=int, metavar="N")
    add(data, "--allowed-max-length", "truncate training sequences to this many tokens (never beyond "
                                      "the model's context)", type=int, metavar="T")
    add(data, "--group-by-length", "batch training examples of similar length together (less padding; "
                                   "hurts when length goes with the kind of example, as in the tasks)",
        action=argparse.BooleanOptionalAction)

    train = parser.add_argument_group("training")
    add(train, "--epochs", "passes over the training set", type=int, metavar="N")
    add(train, "--batch-size", "examples per training step", type=int, metavar="B")
    add(train, "--lr", "peak learning rate of AdamW", type=float)
    add(train, "--weight-decay", "AdamW's decoupled weight decay", type=float, metavar="WD")
    add(train, "--beta2", "AdamW's beta2, the decay of its running mean of squared gradients", type=float)
    add(train, "--schedule", "learning rate after the warm-up: constant, or cosine down to --min-lr",
        choices=SCHEDULES)
    add(train, "--warmup-steps", "steps of linear learning-rate warm-up", type=int, metavar="N")
    add(train, "--min-lr", "learning rate at the end of the cosine schedule", type=float)
    add(train, "--grad-clip", "clip the global gradient norm to this (0: off)", type=float, metavar="NORM")
    add(train, "--eval-freq", "evaluate every N steps", type=int, metavar="N")
    add(train, "--eval-iter", "batches of the training and validation sets per evaluation", type=int,
        metavar="N")
    add(train, "--patience", "stop after N evaluations without a lower validation loss and keep the best "
                             "weights (0/none: off)", type=int, metavar="N")
    add(train, "--max-steps", "stop after N steps in total (0/none: no bound; with --resume, extends "
                              "a bounded run)", type=int, metavar="N")
    add(train, "--checkpoint-every", "write checkpoint.npz every N steps (none: at every evaluation)",
        type=int, metavar="N")
    add(train, "--seed", "seed of the initial weights, the shuffling and dropout", type=int, metavar="N")

    lora = parser.add_argument_group("LoRA (minigpt/lora.py)")
    add(lora, "--lora-rank", f"train only LoRA adapters of this rank, A (in, R) and B (R, out), on every "
                             f"block linear layer ({', '.join(DEFAULT_TARGETS)}); every other weight is "
                             f"frozen (none: full fine-tuning)", type=int, metavar="R")
    add(lora, "--lora-alpha", "LoRA's alpha: the adapters' update is scaled by alpha / rank (none: the rank, "
                              "a scale of 1)", type=float, metavar="A")

    out = parser.add_argument_group("test responses and output")
    add(out, "--max-new-tokens", "longest test response, in tokens", type=int, metavar="N")
    add(out, "--judge-model", "also score the test responses with this Ollama model, e.g. llama3",
        metavar="NAME")
    add(out, "--ollama-url", "address of the Ollama server for --judge-model", metavar="URL")
    add(out, "--judge-timeout", "longest wait for one judge reply, from connecting to its last byte",
        type=float, metavar="SECONDS")
    add(out, "--out-dir", "the run folder (none: runs/<name>)", metavar="DIR")
    add(out, "--name", "name of the run folder under runs/: one folder name, no '/' (none: "
                       "<model>-<data>-<date>-<time>)")
    add(out, "--export-hf", "also write the final and best weights as Hugging Face GPT-2 folders",
        action="store_true")
    add(out, "--fit-check", "before loading the model, estimate the run's peak memory and disk and stop when "
                            "they exceed what the machine has (--no-fit-check: print the estimate and go "
                            "ahead; docs/memory.md)", action=argparse.BooleanOptionalAction)
    out.add_argument("--resume", metavar="DIR",
                     help=f"continue the run in DIR from its checkpoint, exactly as if never stopped, on the "
                          f"same data (checked by fingerprint); only "
                          f"{', '.join('--' + name.replace('_', '-') for name in RESUME_OVERRIDES)} "
                          f"may be given with it. A folder whose run stopped before its first checkpoint has "
                          f"nothing to resume: it is free for a new run (same --out-dir)")
    out.add_argument("--show-batch", nargs="?", const=SHOW_BATCH_ROWS, type=positive_int, metavar="ROWS",
                     help=f"print the first training batch, from the run's own loader, as the model sees "
                          f"it and stop (no training, no run folder): for the first ROWS rows (default "
                          f"{SHOW_BATCH_ROWS}) the decoded input, then each position's input token and "
                          f"target, -100 where the loss ignores it (padding, a masked prompt)")
    return parser


def config_from_flags(settings):
    """The RunConfig of the flags given ({setting: value}): the method's recipe, then the flags."""
    settings = dict(settings)
    return method_run(settings.pop("method", "sft")).make_config(**settings)


def method_run(method):
    """The run module of `method` (RUNS), or a ValueError naming the methods there are."""
    if method not in RUNS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(RUNS)}")
    return RUNS[method]


def main(argv=None):
    """Parse `argv`, run the pipeline; returns the exit code: 0, 2 for an error, 3 when training diverged
    (the loss became NaN or inf), 4 when memory ran out, 130 after Ctrl-C."""
    try:
        settings = vars(build_parser().parse_args(argv))  # only the flags given: defaults are suppressed
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code
    resume_dir = settings.pop("resume", None)
    show_rows = settings.pop("show_batch", None)
    try:
        if resume_dir is not None:
            if show_rows is not None:
                raise ValueError("--show-batch shows the first batch of a new run; it cannot be combined "
                                 "with --resume")
            config = steps.resumed_config(resume_dir, **settings)
            method_run(config.method).run(config, resume=True)
        else:
            config = config_from_flags(settings)
            if show_rows is not None:
                method_run(config.method).show_batch(config, show_rows)
            else:
                method_run(config.method).run(config)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except MemoryError as e:  # OutOfMemory from the run (what ran out, the step, what is kept), or any other
        message = str(e) if isinstance(e, OutOfMemory) else f"out of memory ({e})"
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except (ValueError, TypeError, OSError) as e:  # OSError: missing files, no network (ConnectionError)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
