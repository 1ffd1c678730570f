"""Preference tuning with DPO from start to end: `python train.py --method dpo`.

    python train.py --method dpo --weights runs/NAME/model-final.npz --data pairs.json

    from minigpt.pipeline import dpo_run
    run_dir = dpo_run.run(dpo_run.make_config(weights="runs/NAME/model-final.npz", data="pairs.json"))

`run` reads top to bottom: the preference pairs and their split, the model (a fine-tuned one), the
reference log-probabilities, train, the test pairs' rewards, answer the test prompts, score, files.

The model the run starts from is both the policy, which trains, and the reference, which never changes
(minigpt.dpo). So before the first step its log-probabilities of every pair are computed once, under
no_grad, and kept in the run folder; the policy alone then runs in each step. A run folder holds what a
fine-tuning run's holds (pipeline/sft_run.py; with LoRA the adapters too), and:

    reference-logprobs.npz   the reference's log-probabilities of the train, validation and test pairs,
                             tied to them by fingerprint (minigpt.files.reference_logprobs): a resumed run
                             reads them back
    loss-plot.png            DPO loss and reward margin, training and validation, against epochs

The data are preference pairs, {instruction, input, output, chosen, rejected}: rasbt's
instruction-data-with-preference.json ("reference", downloaded) or a JSON file in that layout, split
85% / 5% / 10% as for fine-tuning. Every evaluation prints, besides the losses, the reward margin and the
reward accuracy of the training and validation pairs; metrics.json adds them for the test pairs.
Test responses are greedy answers to the test prompts, scored against the chosen response.
"""
import dataclasses
import time

import numpy as np

from .. import dpo, tasks, training
from ..data import check_same_data, data_fingerprint
from ..files.checkpoint import CheckpointFile
from ..files.fileio import write_json
from ..files.model_card import make_card
from ..files.reference_logprobs import read_references, write_references
from ..files.weights import weights_fingerprint
from ..loader import DataLoader
from ..model import GPTConfig, GPTModel
from ..nn import eval_mode
from ..preference import (PreferenceDataset, check_pairs_differ, check_pairs_fit, chosen_response,
                          download_preference_data, load_preference_data)
from ..tokenizer import get_tokenizer
from . import fit_check, report, settings, steps, trained_weights
from .memory_estimate import Job, sequence_sizes
from .plotting import plot_dpo

METHOD = "dpo"
# rasbt's DPO settings (ch07/04_preference-tuning-with-dpo), on top of settings.REFERENCE_RECIPE (DPO
# always starts from a fine-tuned model): "reference" data is then his instruction-data-with-preference.json.
RECIPE = dict(settings.REFERENCE_RECIPE, epochs=1, batch_size=8, lr=5e-6, weight_decay=0.01,
              beta=dpo.DEFAULT_BETA, nll_weight=0.0)
REFERENCE_NAME = "reference-logprobs.npz"


def make_config(**given):
    """The RunConfig of a DPO run: the defaults, RECIPE on top (see settings.make_config), then `given`."""
    return settings.make_config(RECIPE, method=METHOD, **given)


def run(config, resume=False, log=print):
    """Tune the model of config.weights (or config.model) on preference pairs with DPO, as `config` (a
    RunConfig) says, and return the run folder. With `resume`, continue the run in config.out_dir from
    its checkpoint. Ctrl-C saves a checkpoint, says how to resume, and re-raises."""
    started = time.monotonic()
    check_settings(config)
    run_dir = steps.run_folder(config.out_dir, config.name, METHOD, config.model, config.weights, config.data)
    config = dataclasses.replace(config, out_dir=str(run_dir))
    config.check_files("preference data", weights=not resume)  # a resumed run's weights are in its checkpoint
    with steps.claimed(run_dir, resume, log) as checkpoint_path:
        checkpoint = CheckpointFile(checkpoint_path, run_config=dataclasses.asdict(config))
        saved = checkpoint.read() if resume else None

        # 1. The data: preference pairs, split into training, validation and test pairs
        tokenizer = get_tokenizer(config.tokenizer, config.vocab_dir)
        splits = load_splits(config.data, config.data_dir, config.shuffle_seed)
        train_entries, val_entries, test_entries = splits
        fingerprint = data_fingerprint(train_entries, val_entries, test_entries)
        if resume:
            check_same_data(saved["train_state"].get("data_fingerprint"), fingerprint, checkpoint_path)

        # 2. Tokenize the pairs once, for the model's context, known before its weights are read; a pair
        #    whose prompt fills the context has no response left to score: it is left out, and counted
        model_config = (GPTConfig(**saved["model_config"]) if resume
                        else steps.model_config_of(config.model, config.weights))
        steps.check_tokenizer_fits(config.tokenizer, tokenizer, model_config.vocab_size)
        cut = min(config.allowed_max_length, model_config.context_length)
        datasets = [PreferenceDataset(entries, tokenizer, config.prompt_style, cut) for entries in splits]
        for dataset, what in zip(datasets, ("training", "validation", "test")):
            check_pairs_fit(dataset, what, log)
        check_pairs_differ(train_entries, "training", log)

        # 3. Memory and disk, as in fine-tuning: each step runs the policy on both responses of each pair
        #    (the reference's log-probabilities are cached: there is no second model)
        train_set = datasets[0]
        job = Job(model_config, config.batch_size, lora_rank=config.lora_rank, dropout=config.drop_rate > 0,
                  max_new_tokens=config.max_new_tokens, export_hf=config.export_hf, sequences_per_example=2,
                  **sequence_sizes(train_set.chosen + train_set.rejected, train_set.prompt_lengths * 2,
                                   True, cut))  # both responses of a pair, each prompt masked
        memory_advice = fit_check.check_fit(
            job, fit_check.run_name("DPO", config.lora_rank, config.model or config.weights), run_dir,
            config.model, config.data_dir, resume, config.fit_check, log)

        # 4. The model: the fine-tuned one, which is both the policy and (frozen) the reference
        if resume:
            model = GPTModel(model_config, seed=config.seed)  # a resumed run's weights are its checkpoint's
        else:
            model = steps.load_model(config.model, config.weights, config.data_dir)
        steps.set_dropout(model, config.drop_rate, config.seed)
        card = make_card(config.tokenizer, config.prompt_style)  # how to talk to it, in every model file
        weights = trained_weights.prepare(model, run_dir, card, config.lora_rank, config.effective_lora_alpha,
                                          config.seed)

        # 5. The reference's log-probabilities of the pairs: computed once from the starting weights, which
        #    the model still holds, or read back on resume
        references_path = run_dir / REFERENCE_NAME
        if resume:
            reference_weights = (saved["train_state"].get("data_fingerprint") or {}).get("reference_weights")
            references = read_references(references_path, datasets, reference_weights)
        else:
            reference_weights = weights_fingerprint(model)  # what identifies the reference model
            references = [dpo.reference_logprobs(model, dataset, config.batch_size) for dataset in datasets]
            write_references(references_path, references, reference_weights)
            log(f"reference log-probabilities of {' / '.join(str(len(d)) for d in datasets)} train / val / "
                f"test pairs: {references_path}")
        train_loader = training_loader(datasets[0], config.batch_size, config.seed)
        val_loader, test_loader = (DataLoader(dataset, config.batch_size) for dataset in datasets[1:])
        objective = DPOObjective(references, config.beta, config.nll_weight)

        # 6. Train: the policy's DPO loss against the cached reference
        optimizer = steps.make_optimizer(model, config.lr, config.beta2, config.weight_decay)
        # The reference's log-probabilities are the other half of DPO's data: the checkpoint records which.
        data_and_reference = {**fingerprint, "reference_weights": reference_weights}
        state = (checkpoint.restore(model, optimizer, train_loader) if resume
                 else training.TrainState(data_fingerprint=data_and_reference))
        write_json(run_dir / "config.json", dataclasses.asdict(config))
        nll = f", chosen NLL weight {config.nll_weight:g}" if config.nll_weight else ""
        log("\n".join(line for line in (
            steps.model_line(config.model or config.weights, model, config.tokenizer),
            f"data: {config.data}: {len(train_entries)} train / {len(val_entries)} val / {len(test_entries)} "
            f"test preference pairs, {config.prompt_style} prompts",
            steps.training_line(config.epochs, len(train_loader), config.batch_size, config.max_steps,
                                config.lr, config.schedule, config.weight_decay)
            + f", DPO beta {config.beta:g}{nll} (the starting model is the reference)",
            f"run folder: {run_dir}",
            weights.summary(model),
            f"resuming at step {state.step}" if resume else None) if line))
        sample = steps.sample_printer(model, tokenizer, val_entries[0], config.prompt_style,
                                      config.max_new_tokens, val_entries[0]["chosen"], log)
        state = training.train(model, optimizer, train_loader, val_loader, config.train_config(), state=state,
                               checkpoint=checkpoint, best=weights.best, on_epoch_end=sample, log=log,
                               objective=objective, suspects=(f"--beta (now {config.beta:g})",
                                                              f"--nll-weight (now {config.nll_weight:g})",
                                                              *weights.suspects),
                               memory_advice=memory_advice)
        write_json(run_dir / "history.json", state.history)
        plot_dpo(state.history, run_dir / "loss-plot.png", title=run_dir.name)

        # 7. The test pairs: DPO loss and rewards, each pair counted once
        with eval_mode(model):
            test_pairs = training.calc_metrics_loader(model, test_loader, objective=objective,
                                                      per_example=True)
        log(format_test_metrics(test_pairs, len(test_entries)))
        lora_entry = weights.write_final(model, log)  # with LoRA, the model is merged from here on
        if config.export_hf:
            steps.export_hf(run_dir, model, run_dir / trained_weights.MODEL_BEST, card, tokenizer)

        # 8. Answer the test prompts, greedily, and score the answers against the chosen responses
        entries = steps.answer_test_set(model, tokenizer, test_entries, config.prompt_style,
                                        config.max_new_tokens, run_dir, log)
        against_chosen = [dict(entry, output=chosen_response(entry)) for entry in entries]
        metrics = steps.score(against_chosen, config.judge_model, config.ollama_url, config.judge_timeout,
                              log)
        metrics.update(steps.training_metrics(state, lora=lora_entry, dpo={
            "beta": config.beta, "nll_weight": config.nll_weight, "test": test_pairs}))
        write_json(run_dir / "metrics.json", metrics)
        report.write_report(run_dir, dict(zip(("training", "validation", "test"), datasets)),
                            time.monotonic() - started, expected=chosen_response)
        log(f"run folder: {run_dir}")
        log(steps.chat_line(run_dir))
    return run_dir


def check_settings(config):
    """The settings every run needs (RunConfig.validate), and DPO's own."""
    config.validate()
    if config.model is None and config.weights is None:
        raise ValueError("DPO tunes a model that was fine-tuned first: give its weights (--weights "
                         "model-final.npz of a fine-tuning run, or --model)")
    if config.data == "tasks" or tasks.selected_kinds(config.data):
        raise ValueError("DPO trains on preference pairs: --data reference (rasbt's, downloaded) "
                         "or a JSON list of {instruction, input, output, chosen, rejected}; "
                         "benchmarks/dpo_demo.py makes one from the built-in tasks")
    if config.group_by_length:
        raise ValueError("group_by_length batches fine-tuning examples; DPO batches pairs in their order")
    dpo.check_beta(config.beta)
    dpo.check_nll_weight(config.nll_weight)


def load_splits(data, data_dir, shuffle_seed):
    """(train, val, test) preference entries: rasbt's ('reference', downloaded into data_dir once) or a
    JSON file's, split 85/5/10."""
    path = download_preference_data(data_dir) if data == "reference" else data
    return steps.split_in_three(load_preference_data(path), shuffle_seed, path, what="pairs")


def training_loader(dataset, batch_size, seed):
    """The run's training loader over the pairs: shuffled with `seed`, full batches only."""
    loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, seed=seed)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training pairs make no full batch of {batch_size}; "
                         f"lower --batch-size")
    return loader


class DPOObjective:
    """training.train's objective for preference pairs: DPO's loss of a PreferenceBatch, with the cached
    reference log-probabilities of its dataset, and the rewards as metrics (dpo.dpo_batch_loss)."""
    printed = ("reward_margin", "reward_accuracy")

    def __init__(self, references, beta=dpo.DEFAULT_BETA, nll_weight=0.0):
        self.references = {reference.fingerprint: reference for reference in references}
        self.beta = beta
        self.nll_weight = nll_weight

    def __call__(self, model, batch):
        return dpo.dpo_batch_loss(model, batch, self.references[batch.fingerprint], self.beta,
                                  self.nll_weight)


def format_test_metrics(metrics, n_pairs):
    """'test pairs (110): DPO loss 0.512, reward margin 0.301, reward accuracy 0.918' (the DPO part of
    the loss alone when it has a chosen-NLL term)."""
    return (f"test pairs ({n_pairs}): DPO loss {metrics.get('dpo_loss', metrics['loss']):.3f}, "
            f"reward margin {metrics['reward_margin']:.3f}, "
            f"reward accuracy {metrics['reward_accuracy']:.3f}")


def show_batch(config, rows=4, log=print):
    """Print the run's first training batch with each pair's rows side by side (row 2i the chosen and row
    2i + 1 the rejected sequence of pair i), as sft_run.show_batch prints fine-tuning's, and return."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    check_settings(config)
    config.check_files("preference data")
    tokenizer = get_tokenizer(config.tokenizer, config.vocab_dir)
    model_config = steps.model_config_of(config.model, config.weights)
    steps.check_tokenizer_fits(config.tokenizer, tokenizer, model_config.vocab_size)
    cut = min(config.allowed_max_length, model_config.context_length)
    train_entries = load_splits(config.data, config.data_dir, config.shuffle_seed)[0]
    dataset = PreferenceDataset(train_entries, tokenizer, config.prompt_style, cut)
    batch = next(iter(training_loader(dataset, config.batch_size, config.seed)))
    order = np.arange(2 * batch.size).reshape(2, -1).T.ravel()  # 0, B, 1, B + 1, ...
    steps.print_first_batch(batch.inputs[order], batch.targets[order], tokenizer, rows,
                            f"{config.prompt_style} prompts, preference pairs: each pair's chosen row, then "
                            f"its rejected row; prompt masked, shuffled with seed {config.seed}, cut at "
                            f"{cut} tokens", log)
