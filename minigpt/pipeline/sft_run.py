"""Instruction fine-tuning from start to end: rasbt's chapter 7 as one run, what `python train.py` does.

    from minigpt.pipeline import sft_run
    run_dir = sft_run.run(sft_run.make_config())                    # the offline default
    run_dir = sft_run.run(sft_run.make_config(model="gpt2-small"))  # the chapter's job
    sft_run.show_batch(sft_run.make_config())                       # its first batch, and stop

`run` reads top to bottom as the chapter's steps: the data and its split, the model, tokenize and
batch, train, answer the test set, score; each step writes its files into the run folder. The settings are a
RunConfig (pipeline/settings.py), unpacked here; what other runs do too is in pipeline/steps.py.

A run folder holds: config.json (the RunConfig), checkpoint.npz (everything needed to continue
exactly), history.json, loss-plot.png, model-final.npz (the weights at the end; after early stopping,
the best ones), model-best.npz (the lowest validation loss), test-responses.json (each test entry
plus "model_response") and metrics.json. With export_hf, also model-final-hf/ and model-best-hf/.
With lora_rank, only LoRA adapters train, and the folder also keeps them alone (trained_weights).
"""
import dataclasses
import time

from .. import tasks, training
from ..data import (InstructionDataset, check_responses_fit, check_same_data, data_fingerprint,
                    download_instruction_data, expected_reply, load_instruction_data)
from ..files.checkpoint import CheckpointFile
from ..files.fileio import write_json
from ..files.model_card import make_card
from ..loader import DataLoader
from ..model import GPTConfig, GPTModel
from ..tokenizer import get_tokenizer
from . import fit_check, report, settings, steps, trained_weights
from .memory_estimate import Job, sequence_sizes
from .plotting import plot_losses

METHOD = "sft"
RECIPE = {}  # fine-tuning's defaults are RunConfig's, and settings.REFERENCE_RECIPE from pretrained weights


def make_config(**given):
    """The RunConfig of a fine-tuning run: the defaults (see settings.make_config), then `given`."""
    return settings.make_config(RECIPE, method=METHOD, **given)


def run(config, resume=False, log=print):
    """Fine-tune as `config` (a RunConfig) says and return the run folder. With `resume`, continue the
    run in config.out_dir from its checkpoint, exactly as if it had never stopped. Ctrl-C saves a
    checkpoint, says how to resume, and re-raises."""
    started = time.monotonic()
    check_settings(config)
    run_dir = steps.run_folder(config.out_dir, config.name, METHOD, config.model, config.weights, config.data)
    config = dataclasses.replace(config, out_dir=str(run_dir))
    config.check_files(weights=not resume)  # a resumed run's weights are in its checkpoint
    with steps.claimed(run_dir, resume, log) as checkpoint_path:
        checkpoint = CheckpointFile(checkpoint_path, run_config=dataclasses.asdict(config))
        saved = checkpoint.read() if resume else None

        # 1. The data: instruction entries (or conversations), split into training, validation and test
        #    entries, and the tokenizer that will read them
        tokenizer = get_tokenizer(config.tokenizer, config.vocab_dir)
        train_entries, val_entries, test_entries = load_splits(
            config.data, config.data_dir, config.shuffle_seed, config.data_seed, config.n_train, config.n_val,
            config.n_test, config.prompt_style)
        fingerprint = data_fingerprint(train_entries, val_entries, test_entries)
        if resume:
            check_same_data(saved["train_state"].get("data_fingerprint"), fingerprint, checkpoint_path)

        # 2. Tokenize once, for the model's context, known before its weights are read; a batch is padded,
        #    shifted by one, the prompt masked if asked, and cut to the context
        model_config = (GPTConfig(**saved["model_config"]) if resume else planned_model_config(
            config.model, config.weights, tokenizer.n_vocab, config.context_length, config.emb_dim,
            config.n_heads, config.n_layers, config.drop_rate))
        steps.check_tokenizer_fits(config.tokenizer, tokenizer, model_config.vocab_size)
        cut = min(config.allowed_max_length, model_config.context_length)
        train_set = InstructionDataset(train_entries, tokenizer, config.prompt_style, config.mask_prompt, cut)
        val_set = InstructionDataset(val_entries, tokenizer, config.prompt_style, config.mask_prompt, cut)
        check_responses_fit(train_set, "training", log)
        check_responses_fit(val_set, "validation", log)

        # 3. Memory and disk: the run's estimate against what the machine has, before the weights are read
        job = Job(model_config, config.batch_size, lora_rank=config.lora_rank, dropout=config.drop_rate > 0,
                  max_new_tokens=config.max_new_tokens, export_hf=config.export_hf,
                  **sequence_sizes(train_set.token_ids, train_set.prompt_lengths, config.mask_prompt, cut))
        memory_advice = fit_check.check_fit(
            job, fit_check.run_name("fine-tuning", config.lora_rank, config.model or config.weights), run_dir,
            config.model, config.data_dir, resume, config.fit_check, log)

        # 4. The model: new, pretrained GPT-2 or a weights file; LoRA on top if asked
        if resume or not config.pretrained:
            model = GPTModel(model_config, seed=config.seed)  # a resumed run's weights are its checkpoint's
        else:
            model = steps.load_model(config.model, config.weights, config.data_dir)
        steps.set_dropout(model, config.drop_rate, config.seed)
        card = make_card(config.tokenizer, config.prompt_style, config.data_settings())  # in every model file
        weights = trained_weights.prepare(model, run_dir, card, config.lora_rank, config.effective_lora_alpha,
                                          config.seed)
        train_loader = training_loader(train_set, config.batch_size, config.seed, config.group_by_length)
        val_loader = DataLoader(val_set, config.batch_size)

        # 5. Train: AdamW, an evaluation every eval_freq steps, checkpoints, the best weights kept
        optimizer = steps.make_optimizer(model, config.lr, config.beta2, config.weight_decay)
        state = (checkpoint.restore(model, optimizer, train_loader) if resume
                 else training.TrainState(data_fingerprint=fingerprint))
        write_json(run_dir / "config.json", dataclasses.asdict(config))
        log("\n".join(line for line in (
            steps.model_line(config.model or config.weights or "new (random weights)", model,
                             config.tokenizer),
            f"data: {config.data}: {len(train_entries)} train / {len(val_entries)} val / {len(test_entries)} "
            f"test, {config.prompt_style} prompts{', prompt masked' if config.mask_prompt else ''}",
            steps.training_line(config.epochs, len(train_loader), config.batch_size, config.max_steps,
                                config.lr, config.schedule, config.weight_decay),
            f"run folder: {run_dir}",
            weights.summary(model),
            f"resuming at step {state.step}" if resume else None) if line))
        sample = steps.sample_printer(model, tokenizer, val_entries[0], config.prompt_style,
                                      config.max_new_tokens, expected_reply(val_entries[0]), log)
        state = training.train(model, optimizer, train_loader, val_loader, config.train_config(), state=state,
                               checkpoint=checkpoint, best=weights.best, on_epoch_end=sample, log=log,
                               suspects=weights.suspects, memory_advice=memory_advice)
        write_json(run_dir / "history.json", state.history)
        plot_losses(state.history, run_dir / "loss-plot.png", title=run_dir.name)
        lora_entry = weights.write_final(model, log)  # with LoRA, the model is merged from here on
        if config.export_hf:
            steps.export_hf(run_dir, model, run_dir / trained_weights.MODEL_BEST, card, tokenizer)

        # 6. Answer the test set, greedily: test-responses.json
        entries = steps.answer_test_set(model, tokenizer, test_entries, config.prompt_style,
                                        config.max_new_tokens, run_dir, log)

        # 7. Score the answers
        metrics = steps.score(entries, config.judge_model, config.ollama_url, config.judge_timeout, log)
        metrics.update(steps.training_metrics(state, lora=lora_entry))
        write_json(run_dir / "metrics.json", metrics)
        report.write_report(run_dir, {"training": train_loader.dataset, "validation": val_set},
                            time.monotonic() - started)
        log(f"run folder: {run_dir}")
        log(steps.chat_line(run_dir))
    return run_dir


def check_settings(config):
    """The settings every run needs (RunConfig.validate); fine-tuning has none of its own to check."""
    config.validate()


def load_splits(data, data_dir, shuffle_seed, data_seed, n_train, n_val, n_test, style):
    """(train, val, test) lists of entries: the built-in tasks ('tasks', 'tasks:KIND,...'), rasbt's
    instruction data ('reference', downloaded into data_dir once) or a JSON file of instructions and
    conversations, checked against the template `style`, split 85/5/10."""
    kinds = tasks.selected_kinds(data)
    if kinds is not None:
        return tasks.make_task_splits(seed=data_seed, n_train=n_train, n_val=n_val, n_test=n_test,
                                      tasks=kinds)
    path = download_instruction_data(data_dir) if data == "reference" else data
    return steps.split_in_three(load_instruction_data(path, style), shuffle_seed, path)


def planned_model_config(model_name, weights_path, vocab_size, context_length, emb_dim, n_heads, n_layers,
                         drop_rate):
    """The GPTConfig of the model a new run starts from, known before any weights are read: pretrained
    GPT-2's or a weights file's (steps.model_config_of), else a new model's of the sizes given."""
    if model_name is not None or weights_path is not None:
        return steps.model_config_of(model_name, weights_path)
    return new_model_config(vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate)


def new_model_config(vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate):
    """The GPTConfig of a model trained from scratch: the run's sizes, the tokenizer's vocabulary."""
    return GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=n_heads,
                     n_layers=n_layers, drop_rate=drop_rate)


def training_loader(dataset, batch_size, seed, group_by_length):
    """The run's training loader over `dataset` (an InstructionDataset): shuffled with `seed`, full batches
    only."""
    loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, seed=seed,
                        group_by_length=group_by_length)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training entries make no full batch of {batch_size}; "
                         f"lower --batch-size")
    return loader


def show_batch(config, rows=4, log=print):
    """Print the first training batch of the run `config` describes, as the model sees it (the first
    `rows` rows, see data.format_batch), and return. Nothing is trained and no run folder is made;
    the loader is the run's own (same data, batch size, seed, masking and cut)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    check_settings(config)
    config.check_files()
    tokenizer = get_tokenizer(config.tokenizer, config.vocab_dir)
    model_config = planned_model_config(config.model, config.weights, tokenizer.n_vocab,
                                        config.context_length, config.emb_dim, config.n_heads,
                                        config.n_layers, config.drop_rate)
    steps.check_tokenizer_fits(config.tokenizer, tokenizer, model_config.vocab_size)
    cut = min(config.allowed_max_length, model_config.context_length)
    train_entries = load_splits(config.data, config.data_dir, config.shuffle_seed, config.data_seed,
                                config.n_train, config.n_val, config.n_test, config.prompt_style)[0]
    train_set = InstructionDataset(train_entries, tokenizer, config.prompt_style, config.mask_prompt, cut)
    loader = training_loader(train_set, config.batch_size, config.seed, config.group_by_length)
    inputs, targets = next(iter(loader))                                # (B, T), (B, T)
    masking = "prompt masked" if config.mask_prompt else "no prompt masking"
    steps.print_first_batch(inputs, targets, tokenizer, rows, f"{config.prompt_style} prompts, {masking}, "
                            f"shuffled with seed {config.seed}, cut at {cut} tokens", log)
