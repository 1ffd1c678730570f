"""The fine-tuning pipeline: data -> model -> train -> test-set responses -> scores -> run folder.

    from minigpt import finetune
    run_dir = finetune.run(finetune.RunConfig())                    # the offline default
    run_dir = finetune.run(finetune.make_config(model="gpt2-small"))  # rasbt's ch. 7 job
    finetune.resume(run_dir, max_steps=0)                             # continue, to the end
    finetune.show_batch(finetune.RunConfig())                         # the first batch, and stop

The settings are a RunConfig (minigpt.run_config: the offline recipe, rasbt's recipe from pretrained
GPT-2, DPO's). With method "dpo", the run tunes a fine-tuned model on preference pairs instead
(minigpt.dpo_finetune), in the same kind of run folder.

A run folder holds: config.json (the RunConfig), checkpoint.npz (everything needed to continue
exactly), history.json, loss-plot.png, model-final.npz (the weights at the end; after early stopping,
the best ones), model-best.npz (the lowest validation loss), test-responses.json (each test entry
plus "model_response") and metrics.json. With export_hf, also model-final-hf/ and model-best-hf/.
With lora_rank, only LoRA adapters train, and the folder also keeps them alone (lora_finetune).
"""
import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from . import dpo_finetune, lora_finetune, runfolder, tasks, training, weights
from .checkpoint import TrainState, read_checkpoint, restore_checkpoint
from .data import (DataLoader, InstructionDataset, check_responses_fit, check_same_data, data_fingerprint,
                   download_instruction_data, format_batch, load_instruction_data, split_data)
from .evaluate import JudgeUnavailable, judge_responses, score_responses
from .fileio import write_json
from .losses import IGNORE_INDEX
from .model import GPTConfig, GPTModel
from .nn import Dropout
from .optim import AdamW
from .plotting import plot_dpo, plot_losses
from .responses import generate_responses, with_responses
from .run_config import (DATASETS, DPO_RECIPE, METHODS, REFERENCE_RECIPE, RESUME_OVERRIDES,  # noqa: F401
                         RunConfig, make_config)                                           # (re-exported)
from .tokenizer import get_tokenizer

CHECKPOINT_NAME = "checkpoint.npz"


# ---------------------------------------------------------------------------------------------
# Data and model

def load_splits(config):
    """(train, val, test) lists of entries."""
    kinds = tasks.selected_kinds(config.data)
    if kinds is not None:
        return tasks.make_task_splits(seed=config.data_seed, n_train=config.n_train, n_val=config.n_val,
                                      n_test=config.n_test, tasks=kinds)
    path = download_instruction_data(config.data_dir) if config.data == "reference" else config.data
    train, val, test = split_data(load_instruction_data(path), shuffle_seed=config.shuffle_seed)
    if not (train and val and test):
        raise ValueError(f"{path}: {len(train)} train / {len(val)} validation / {len(test)} test entries "
                         f"after the 85% / 5% / 10% split; every part needs at least one (use more entries)")
    return train, val, test


def build_model(config, tokenizer, model_config=None):
    """The model to train: from `model_config` (a resumed run: weights come from its checkpoint),
    pretrained GPT-2, a weights file, or new from the config's sizes."""
    if model_config is not None:
        model = GPTModel(GPTConfig(**model_config), seed=config.seed)
    elif config.model is not None:
        model = weights.pretrained_gpt2(config.model, config.data_dir)
    elif config.weights is not None:
        model = weights.load_weights(config.weights)
    else:
        model = GPTModel(new_model_config(config, tokenizer), seed=config.seed)
    check_tokenizer_fits(config, tokenizer, model.cfg)
    # A loaded model gets the run's dropout and a dropout RNG seeded like a new model's.
    model.cfg.drop_rate = config.drop_rate
    for _, module in model.named_modules():
        if isinstance(module, Dropout):
            module.p = config.drop_rate
    model.dropout_rng.bit_generator.state = np.random.default_rng(config.seed + 1).bit_generator.state
    return model


def model_config_of(config, tokenizer):
    """The GPTConfig of the model a run would train, read without its weights where possible: a new
    model's from the settings, GPT-2's from its preset, a .npz's from its stored config; a Hugging
    Face file's config is read off its tensors, so that one is loaded."""
    if config.model is not None:
        cfg = GPTConfig.preset(config.model)
    elif config.weights is not None and weights.weights_format(config.weights) == "npz":
        cfg = weights.read_npz_config(config.weights)
    elif config.weights is not None:
        cfg = weights.load_hf_gpt2(config.weights).cfg
    else:
        cfg = new_model_config(config, tokenizer)
    check_tokenizer_fits(config, tokenizer, cfg)
    return cfg


def new_model_config(config, tokenizer):
    """The GPTConfig of a model trained from scratch: the run's sizes, the tokenizer's vocabulary."""
    return GPTConfig(vocab_size=tokenizer.n_vocab, context_length=config.context_length,
                     emb_dim=config.emb_dim, n_heads=config.n_heads, n_layers=config.n_layers,
                     drop_rate=config.drop_rate)


def check_tokenizer_fits(config, tokenizer, model_config):
    if tokenizer.n_vocab > model_config.vocab_size:
        raise ValueError(f"the {config.tokenizer} tokenizer has {tokenizer.n_vocab} tokens but the model "
                         f"only {model_config.vocab_size}; use the tokenizer the model was trained with "
                         f"(--tokenizer)")


def loader_settings(config, tokenizer, context_length):
    """What the training and validation loaders share: batch size, masking, padding, the cut."""
    return dict(batch_size=config.batch_size, mask_prompt=config.mask_prompt,
                pad_token_id=tokenizer.eot_token,
                allowed_max_length=min(config.allowed_max_length, context_length))


def training_loader(config, tokenizer, entries, context_length):
    """The run's training loader: shuffled with config.seed, full batches only."""
    loader = DataLoader(InstructionDataset(entries, tokenizer, config.prompt_style), shuffle=True,
                        drop_last=True, seed=config.seed, group_by_length=config.group_by_length,
                        **loader_settings(config, tokenizer, context_length))
    if len(loader) == 0:
        raise ValueError(f"{len(entries)} training entries make no full batch of {config.batch_size}; "
                         f"lower --batch-size")
    return loader


def default_name(config):
    """<model>-<data>-<date>-<time>, e.g. gpt2-small-reference-20250101-120000; DPO runs start dpo-."""
    source = config.model or (Path(config.weights).stem if config.weights else "scratch")
    dataset = (config.data if config.data in DATASETS or tasks.selected_kinds(config.data)
               else Path(config.data).stem)
    dataset = re.sub(r"[^\w.]+", "-", dataset)  # tasks:swapcase*5,add -> tasks-swapcase-5-add
    method = "dpo-" if config.method == "dpo" else ""
    return f"{method}{source}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------------------------------
# The pipeline

def run(config, resume=False, log=print):
    """Run the whole pipeline for `config` and return its run folder. With `resume`, continue the run
    in config.out_dir from its checkpoint. The folder is claimed first (minigpt.runfolder: one run at a
    time). Ctrl-C saves a checkpoint, says how to resume, re-raises."""
    config.validate()
    run_dir = Path(config.out_dir or Path("runs") / (config.name or default_name(config)))
    config = dataclasses.replace(config, out_dir=str(run_dir))
    config.check_files(weights=not resume)  # a resumed run's weights are in its checkpoint
    with runfolder.claim(run_dir, resume, CHECKPOINT_NAME, log):
        return run_claimed(run_dir, config, resume, log)


def run_claimed(run_dir, config, resume, log):
    """run()'s work, in the run folder it has claimed."""
    checkpoint = run_dir / CHECKPOINT_NAME
    meta = read_checkpoint(checkpoint) if resume else None
    tokenizer = get_tokenizer(config.tokenizer, config.vocab_dir)
    dpo_run = None  # with method "dpo": the preference pairs' loaders, references and objective
    splits = dpo_finetune.load_splits(config) if config.method == "dpo" else load_splits(config)
    train_entries, val_entries, test_entries = splits
    fingerprint = data_fingerprint(train_entries, val_entries, test_entries)
    if resume:
        check_same_data(meta["train_state"].get("data_fingerprint"), fingerprint, checkpoint)
    model = build_model(config, tokenizer, meta["model_config"] if resume else None)
    lora_config = lora_finetune.apply_to_run(model, config)  # None: LoRA is off, every weight trains
    if config.method == "dpo":  # the model still holds the starting weights: the reference's
        dpo_run = dpo_finetune.prepare(run_dir, config, model, tokenizer, splits, resume, log)
        train_loader, val_loader, objective = dpo_run.train_loader, dpo_run.val_loader, dpo_run.objective
    else:
        train_loader = training_loader(config, tokenizer, train_entries, model.cfg.context_length)
        val_loader = DataLoader(InstructionDataset(val_entries, tokenizer, config.prompt_style),
                                **loader_settings(config, tokenizer, model.cfg.context_length))
        for loader, what in ((train_loader, "training"), (val_loader, "validation")):
            check_responses_fit(loader, what, log)
        objective = training.lm_loss
    optimizer = AdamW(model.parameters(trainable_only=True), lr=config.lr, betas=(0.9, config.beta2),
                      weight_decay=config.weight_decay)
    state = (restore_checkpoint(checkpoint, model, optimizer, train_loader) if resume
             else TrainState(data_fingerprint=fingerprint))
    write_json(run_dir / "config.json", dataclasses.asdict(config))
    log(describe(config, model, train_loader, len(val_entries), len(test_entries), run_dir,
                 state if resume else None))

    def print_sample(state):  # after every epoch: a greedy response to the first validation prompt
        entry = val_entries[0]
        response = generate_responses(model, tokenizer, [entry], config.prompt_style, config.max_new_tokens,
                                      progress=False)[0]
        log(f"sample after epoch {state.loader_state['epoch']}: {entry['instruction']} {entry['input']!r} "
            f"-> {response!r} (expected {entry.get('chosen', entry['output'])!r})")

    try:
        best = lora_finetune.best_keeper(run_dir, lora_config)  # model-best.npz, or the best adapters
        state = training.train(model, optimizer, train_loader, val_loader, config.train_config(), state=state,
                               checkpoint_path=checkpoint, best=best, run_config=dataclasses.asdict(config),
                               on_epoch_end=print_sample, log=log, objective=objective)
        finish(run_dir, config, model, tokenizer, state, test_entries, log, dpo_run)
    except KeyboardInterrupt:
        log(f"\nInterrupted. Continue the run with:  python train.py --resume {run_dir}")
        raise
    return run_dir


def show_batch(config, rows=4, log=print):
    """Print the first training batch of the run `config` describes, as the model sees it (the first
    `rows` rows, see data.format_batch), and return. Nothing is trained and no run folder is made;
    the loader is the run's own (same data, batch size, seed, masking and cut)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    config.validate()
    config.check_files()
    tokenizer = get_tokenizer(config.tokenizer, config.vocab_dir)
    context_length = model_config_of(config, tokenizer).context_length
    if config.method == "dpo":
        inputs, targets, cut = dpo_finetune.first_batch(config, tokenizer, context_length)
        what = "preference pairs: each pair's chosen row, then its rejected row; prompt masked"
    else:
        loader = training_loader(config, tokenizer, load_splits(config)[0], context_length)
        inputs, targets = next(iter(loader))                                # (B, T), (B, T)
        cut = loader.allowed_max_length
        what = 'prompt masked' if config.mask_prompt else 'no prompt masking'
    log(f"first training batch: {inputs.shape[0]} rows x {inputs.shape[1]} positions "
        f"({config.prompt_style} prompts, {what}, shuffled with seed {config.seed}, cut at {cut} tokens); "
        f"target {IGNORE_INDEX}: ignored by the loss")
    log(format_batch(inputs, targets, tokenizer, rows))


def resume(run_dir, log=print, **overrides):
    """Continue the run in `run_dir` from its checkpoint; only RESUME_OVERRIDES settings may change."""
    run_dir = Path(run_dir)
    runfolder.require_checkpoint(run_dir, CHECKPOINT_NAME)
    fixed = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if fixed:
        raise ValueError(f"a resumed run keeps its settings ({run_dir / 'config.json'}); it cannot change "
                         f"{', '.join(fixed)} (only {', '.join(RESUME_OVERRIDES)})")
    config = RunConfig(**read_checkpoint(run_dir / CHECKPOINT_NAME)["run_config"])
    return run(dataclasses.replace(config, out_dir=str(run_dir), **overrides), resume=True, log=log)


def describe(config, model, train_loader, n_val, n_test, run_dir, state=None):
    """A few lines on what is about to run."""
    cfg = model.cfg
    source = config.model or config.weights or "new (random weights)"
    steps = config.epochs * len(train_loader)
    if config.max_steps:
        steps = min(steps, config.max_steps)
    dpo_settings = ""
    if config.method == "dpo":
        nll = f", chosen NLL weight {config.nll_weight:g}" if config.nll_weight else ""
        dpo_settings = f", DPO beta {config.beta:g}{nll} (the starting model is the reference)"
    lines = [
        f"model: {source}; {model.num_parameters() / 1e6:.2f}M parameters (emb {cfg.emb_dim}, "
        f"{cfg.n_layers} layers, {cfg.n_heads} heads, context {cfg.context_length}), "
        f"{config.tokenizer} tokenizer",
        f"data: {config.data}: {len(train_loader.dataset)} train / {n_val} val / {n_test} test"
        + (f" preference pairs, {config.prompt_style} prompts" if config.method == "dpo" else
           f", {config.prompt_style} prompts{', prompt masked' if config.mask_prompt else ''}"),
        f"training: {steps} steps ({config.epochs} epoch(s) of {len(train_loader)} batches of "
        f"{config.batch_size}), AdamW lr {config.lr:g} ({config.schedule}), "
        f"weight decay {config.weight_decay:g}{dpo_settings}",
        f"run folder: {run_dir}"]
    if config.lora_rank is not None:
        lines.append(lora_finetune.describe(model))
    if state is not None:
        lines.append(f"resuming at step {state.step}")
    return "\n".join(lines)


def finish(run_dir, config, model, tokenizer, state, test_entries, log=print, dpo_run=None):
    """Write the history, plot and weights; answer the test set; score; write metrics.json. A DPO run
    (`dpo_run`) also scores its test pairs, and its responses against their chosen response."""
    write_json(run_dir / "history.json", state.history)
    plot = plot_losses if dpo_run is None else plot_dpo
    plot(state.history, run_dir / "loss-plot.png", title=run_dir.name)
    dpo_entry = None
    if dpo_run is not None:
        dpo_entry = {"beta": config.beta, "nll_weight": config.nll_weight,
                     "test": dpo_finetune.test_metrics(model, dpo_run)}
        log(dpo_finetune.format_test_metrics(dpo_entry["test"], len(test_entries)))
    lora_entry = None
    if config.lora_rank is not None:  # the adapters alone, and merged weights (the model stays merged)
        lora_entry = lora_finetune.write_weights(run_dir, model)
        log(lora_finetune.format_sizes(lora_entry))
    else:
        weights.save_npz(model, run_dir / "model-final.npz")
    if config.export_hf:
        weights.save_hf_gpt2(model, run_dir / "model-final-hf")
        weights.save_hf_gpt2(weights.load_npz(run_dir / "model-best.npz"), run_dir / "model-best-hf")
    log(f"generating responses to {len(test_entries)} test entries")
    responses = generate_responses(model, tokenizer, test_entries, config.prompt_style, config.max_new_tokens)
    entries = with_responses(test_entries, responses)
    write_json(run_dir / "test-responses.json", entries)
    metrics = score(entries if dpo_run is None else dpo_finetune.scored_against_chosen(entries), config, log)
    metrics.update(steps=state.step, tokens_seen=state.tokens_seen, best_step=state.best_step,
                   best_val_loss=state.best_val_loss, stopped_early=state.stopped_early,
                   final_val_loss=state.history["val_loss"][-1] if state.history["val_loss"] else None,
                   lora=lora_entry, dpo=dpo_entry)
    write_json(run_dir / "metrics.json", metrics)
    log(f"run folder: {run_dir}")
    return metrics


def score(entries, config, log=print):
    """Exact match (overall and per task kind, when entries have "task"), ROUGE-L F1, the optional judge."""
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
    if config.judge_model:
        try:
            metrics["judge"] = judge_responses(entries, model=config.judge_model, url=config.ollama_url,
                                               timeout=config.judge_timeout)
            mean = metrics["judge"]["mean_score"]
            log(f"judge ({config.judge_model}): {'n/a' if mean is None else f'{mean:.1f}'} / 100")
        except JudgeUnavailable as e:
            log(f"skipping the LLM judge: {e}")
    return metrics
