"""The steps every run shares: its folder, the model, the optimizer, the summary lines, the scores.

A run (pipeline/sft_run.py, pipeline/dpo_run.py) reads top to bottom as its method's steps and calls
these for what does not depend on the method. Each takes the values it uses, never the whole RunConfig.
"""
import contextlib
import dataclasses
import re
import shlex
import time
from pathlib import Path

import numpy as np

from .. import tasks
from ..data import expected_reply, format_batch, split_data
from ..evaluate.judge import JudgeUnavailable, judge_responses
from ..evaluate.scores import score_responses
from ..files import runfolder
from ..files.checkpoint import read_checkpoint
from ..files.fileio import write_json
from ..files.model_card import model_file
from ..files.weights import load_npz, load_weights, pretrained_gpt2, read_weights_config, save_hf_gpt2
from ..losses import IGNORE_INDEX
from ..model import GPTConfig, GPTModel
from ..nn import Dropout
from ..optim import AdamW
from ..training import OutOfMemory
from .responses import generate_responses, with_responses
from .settings import DATASETS, RESUME_OVERRIDES, RunConfig

CHECKPOINT_NAME = "checkpoint.npz"


# ---------------------------------------------------------------------------------------------
# The run folder

def run_folder(out_dir, name, method, model, weights, data):
    """The folder of a run: out_dir, else runs/<name>, else runs/<method>-<model>-<data>-<date>-<time>
    (fine-tuning leaves out the method: gpt2-small-reference-20250101-120000)."""
    if out_dir:
        return Path(out_dir)
    if name:
        return Path("runs") / name
    source = model or (Path(weights).stem if weights else "scratch")
    dataset = data if data in DATASETS or tasks.selected_kinds(data) else Path(data).stem
    dataset = re.sub(r"[^\w.]+", "-", dataset)  # tasks:swapcase*5,add -> tasks-swapcase-5-add
    prefix = "" if method == "sft" else f"{method}-"
    return Path("runs") / f"{prefix}{source}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def claimed(run_dir, resume, log=print):
    """Hold `run_dir` for this run (files.runfolder: one run at a time) -> the checkpoint's path; after a
    Ctrl-C that left a checkpoint (training saves one when interrupted), say how to continue. A MemoryError
    becomes training.OutOfMemory, whose one line says how to continue too."""
    checkpoint_path = run_dir / CHECKPOINT_NAME
    with runfolder.claim(run_dir, resume, CHECKPOINT_NAME, log):
        try:
            yield checkpoint_path
        except KeyboardInterrupt:
            if checkpoint_path.is_file():
                log(f"\nInterrupted. Continue the run with:  python train.py --resume {run_dir}")
            raise
        except MemoryError as e:  # the training loop's OutOfMemory, or memory running out at another step
            message = str(e) if isinstance(e, OutOfMemory) else f"out of memory ({' '.join(str(e).split())})"
            if checkpoint_path.is_file():
                if not isinstance(e, OutOfMemory):  # reading the checkpoint's JSON takes next to no memory
                    step = read_checkpoint(checkpoint_path)["train_state"]["step"]
                    message += f"; {checkpoint_path} keeps step {step}"
                message += f"; continue the run with: python train.py --resume {run_dir}"
            raise OutOfMemory(message) from None


def resumed_config(run_dir, **overrides):
    """The RunConfig of the run in `run_dir`, from its checkpoint, with `overrides` (only RESUME_OVERRIDES
    may change: they bound the run or act after training) and out_dir set to the folder."""
    run_dir = Path(run_dir)
    runfolder.require_checkpoint(run_dir, CHECKPOINT_NAME)
    fixed = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if fixed:
        raise ValueError(f"a resumed run keeps its settings ({run_dir / 'config.json'}); it cannot change "
                         f"{', '.join(fixed)} (only {', '.join(RESUME_OVERRIDES)})")
    saved = read_checkpoint(run_dir / CHECKPOINT_NAME)["run_config"]
    if saved.get("method") == "sft" and (saved.get("beta"), saved.get("nll_weight")) == (0.1, 0.0):
        saved.update(beta=None, nll_weight=None)  # a run from before these were DPO's alone: their defaults
    return dataclasses.replace(RunConfig(**saved), out_dir=str(run_dir), **overrides)


# ---------------------------------------------------------------------------------------------
# Data and model

def split_in_three(entries, shuffle_seed, source, what="entries"):
    """(train, val, test) of `entries`: 85% / 5% / 10% as data.split_data cuts them; a ValueError naming
    `source` when a part would be empty."""
    train, val, test = split_data(entries, shuffle_seed=shuffle_seed)
    if not (train and val and test):
        raise ValueError(f"{source}: {len(train)} train / {len(val)} validation / {len(test)} test {what} "
                         f"after the 85% / 5% / 10% split; every part needs at least one (use more {what})")
    return train, val, test


def load_model(model_name, weights_path, data_dir):
    """Pretrained GPT-2 `model_name` (downloaded into data_dir once) or the weights file `weights_path`
    (a run folder: its model-final.npz)."""
    if model_name is not None:
        return pretrained_gpt2(model_name, data_dir)
    return load_weights(model_file(weights_path))


def model_config_of(model_name, weights_path):
    """The GPTConfig of the model load_model would load, read without its weights: GPT-2's from its preset,
    a .npz's from its stored config, a Hugging Face file's from its header and config.json."""
    if model_name is not None:
        return GPTConfig.preset(model_name)
    return read_weights_config(model_file(weights_path))


def check_tokenizer_fits(tokenizer_name, tokenizer, vocab_size):
    """The tokenizer's ids must be the model's embedding rows, one for one. A bigger tokenizer makes ids the
    model has no row for; a smaller one leaves rows the model may generate and the tokenizer cannot
    decode (the test responses would fail at the end of the run)."""
    if tokenizer.n_vocab != vocab_size:
        raise ValueError(f"the {tokenizer_name} tokenizer has {tokenizer.n_vocab} tokens but the model's "
                         f"vocabulary has {vocab_size}; use the tokenizer the model was trained with "
                         f"(--tokenizer)")


def set_dropout(model, drop_rate, seed):
    """The run's dropout rate in every Dropout layer, and a dropout RNG seeded as a new model's (seed + 1):
    a loaded model trains as one built here would."""
    model.cfg.drop_rate = drop_rate
    for _, module in model.named_modules():
        if isinstance(module, Dropout):
            module.p = drop_rate
    model.dropout_rng.bit_generator.state = np.random.default_rng(seed + 1).bit_generator.state


def resumed_model(saved_config, seed):
    """A model of a checkpoint's stored GPTConfig; its weights come from the checkpoint."""
    return GPTModel(GPTConfig(**saved_config), seed=seed)


def make_optimizer(model, lr, beta2, weight_decay):
    """AdamW over the parameters that train (with LoRA: the adapters alone)."""
    return AdamW(model.parameters(trainable_only=True), lr=lr, betas=(0.9, beta2), weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------
# What a run prints

def model_line(source, model, tokenizer_name):
    cfg = model.cfg
    return (f"model: {source}; {model.num_parameters() / 1e6:.2f}M parameters (emb {cfg.emb_dim}, "
            f"{cfg.n_layers} layers, {cfg.n_heads} heads, context {cfg.context_length}), "
            f"{tokenizer_name} tokenizer")


def training_line(epochs, batches_per_epoch, batch_size, max_steps, lr, schedule, weight_decay):
    steps = epochs * batches_per_epoch
    if max_steps:
        steps = min(steps, max_steps)
    return (f"training: {steps} steps ({epochs} epoch(s) of {batches_per_epoch} batches of {batch_size}), "
            f"AdamW lr {lr:g} ({schedule}), weight decay {weight_decay:g}")


def print_first_batch(inputs, targets, tokenizer, rows, what, log=print):
    """--show-batch: the first training batch (inputs, targets (B, T)) as text, the first `rows` rows."""
    log(f"first training batch: {inputs.shape[0]} rows x {inputs.shape[1]} positions ({what}); "
        f"target {IGNORE_INDEX}: ignored by the loss")
    log(format_batch(inputs, targets, tokenizer, rows))


def sample_printer(model, tokenizer, entry, style, max_new_tokens, expected, log=print):
    """training.train's on_epoch_end: a greedy response to `entry` after every epoch, beside `expected`."""
    if "messages" in entry:  # a conversation: its last request, answered after the messages before it
        messages = entry["messages"]
        question = f"{messages[-2]['content']!r} (after {len(messages) - 2} messages)"
    else:
        question = f"{entry['instruction']} {entry['input']!r}"

    def print_sample(state):
        response = generate_responses(model, tokenizer, [entry], style, max_new_tokens, progress=False)[0]
        log(f"sample after epoch {state.loader_state['epoch']}: {question} -> {response!r} "
            f"(expected {expected!r})")
    return print_sample


# ---------------------------------------------------------------------------------------------
# The end of a run

def export_hf(run_dir, model, best_model_path, card, tokenizer):
    """--export-hf: the final and the best weights as Hugging Face GPT-2 folders, each with the model card
    and the tokenizer files with the chat template (files.hf_tokenizer)."""
    save_hf_gpt2(model, run_dir / "model-final-hf", card, tokenizer)
    save_hf_gpt2(load_npz(best_model_path), run_dir / "model-best-hf", card, tokenizer)


def chat_line(run_dir):
    """The last line of a run: the command that talks with the model it made (its card says how)."""
    return f"chat with the model: python generate.py {shlex.quote(str(run_dir))} --chat"


def answer_test_set(model, tokenizer, entries, style, max_new_tokens, run_dir, log=print):
    """Greedy responses to the test entries, written with them to run_dir/test-responses.json (each entry
    plus "model_response", as rasbt's instruction-data-with-response.json) -> those entries."""
    log(f"generating responses to {len(entries)} test entries")
    answered = with_responses(entries, generate_responses(model, tokenizer, entries, style, max_new_tokens))
    write_json(run_dir / "test-responses.json", answered)
    return answered


def score(entries, judge_model=None, ollama_url=None, judge_timeout=None, log=print):
    """Exact match (overall and per task kind, when entries have "task"), ROUGE-L F1, the optional judge;
    a conversation's response is scored against its last reply."""
    conversations = any("messages" in entry for entry in entries)
    entries = [dict(entry, output=expected_reply(entry)) for entry in entries]
    scores = score_responses(entries)
    metrics = {"count": scores["count"], "exact_match": scores["exact_match"], "exact_match_by_task": {},
               "rouge_l_f1": scores["rouge_l_f1"], "judge": None}
    if all("task" in entry for entry in entries):
        _, metrics["exact_match_by_task"] = tasks.exact_match_by_task(
            entries, [entry["model_response"] for entry in entries])
    log(f"test set ({metrics['count']} responses): exact match {metrics['exact_match']:.1%}, "
        f"ROUGE-L F1 {metrics['rouge_l_f1']:.3f}")
    for task, rate in sorted(metrics["exact_match_by_task"].items()):
        log(f"  {task:<12} exact match {rate:.1%}")
    if judge_model and conversations:
        log("skipping the LLM judge: its prompt (rasbt's) scores a response to one instruction, not a "
            "conversation")
    elif judge_model:
        try:
            metrics["judge"] = judge_responses(entries, model=judge_model, url=ollama_url,
                                               timeout=judge_timeout)
            mean = metrics["judge"]["mean_score"]
            log(f"judge ({judge_model}): {'n/a' if mean is None else f'{mean:.1f}'} / 100")
        except JudgeUnavailable as e:
            log(f"skipping the LLM judge: {e}")
    return metrics


def training_metrics(state, lora=None, dpo=None):
    """metrics.json's account of the training: steps, tokens, the best and the final validation loss, and
    the method's entries: "lora" (trained_weights' write_final), "dpo" (the test pairs), None without."""
    val_losses = state.history["val_loss"]
    return dict(steps=state.step, tokens_seen=state.tokens_seen, best_step=state.best_step,
                best_val_loss=state.best_val_loss, stopped_early=state.stopped_early,
                final_val_loss=val_losses[-1] if val_losses else None, lora=lora, dpo=dpo)
