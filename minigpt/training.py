"""The training loop: AdamW steps under a learning-rate schedule, periodic evaluation, early stopping
and checkpoints that resume exactly (minigpt.files.checkpoint). After rasbt's `train_model_simple` and
`calc_loss_loader` (ch. 5, 7).

One optimizer step on a batch of inputs and targets, both (B, T):

    optimizer.zero_grad()
    loss = model.loss(inputs, targets)        # mean cross-entropy over targets != IGNORE_INDEX
    loss.backward()
    clip_grad_norm(params, grad_clip)         # optional: global gradient norm <= grad_clip
    optimizer.lr = learning_rate(step, ...)   # warm-up, then constant or cosine
    optimizer.step()
    tokens_seen += B * T                      # input tokens, padding included, as the reference counts

Every `eval_freq` steps (and before the first, and after the last) the mean loss over the first
`eval_iter` batches of the training and validation sets is recorded in the history.

The loss is the objective's: `lm_loss` (the default) is fine-tuning's cross-entropy on (inputs, targets)
batches; another objective (minigpt.pipeline.dpo_run.DPOObjective: preference pairs) is any callable
objective(model, batch) -> (loss Tensor, metrics dict of floats), whose metrics are averaged and
recorded next to the loss (history "train_<name>", "val_<name>"), and those it names in `.printed`
shown on each progress line.

Exact resume: a TrainState holds, with the weights and Adam's m and v and step counts, everything the
next step depends on (the training loader's position and RNG, the dropout RNG, the history, early
stopping). A checkpoint file (minigpt.files.checkpoint) keeps all of it, so restoring one and calling
`train` continues with the very losses an uninterrupted run would have had.
Ctrl-C is held back during an update, so a checkpoint never holds a half-applied step.
Divergence stops the run: a training or evaluation loss that is NaN or inf raises TrainingDiverged
(before that step's update), and neither a checkpoint nor the best weights are ever written with
non-finite weights, so both keep the last finite ones.
Memory running out (a MemoryError in a step or an evaluation) saves the last completed step, once the
failed step's activations are released, and raises OutOfMemory; if it ran out inside an update, which
may be half applied, nothing is saved and the previous checkpoint stays.
"""
import contextlib
import dataclasses
import math
import signal
import threading
import time
from typing import Optional

import numpy as np

from .loader import DataLoader
from .nn import eval_mode, non_finite
from .optim import clip_grad_norm
from .tensor import no_grad

SCHEDULES = ("constant", "cosine")


class TrainingDiverged(ArithmeticError):
    """A loss, or the weights, stopped being finite numbers: the run cannot recover, so it stops."""


class OutOfMemory(MemoryError):
    """Memory ran out during a run; the message says after which step, and which checkpoint keeps it."""


class HalfApplied(MemoryError):
    """Memory ran out inside an all_or_nothing block: what it changes may be half changed."""

    def __init__(self, what, allocation):
        super().__init__(f"{what} ({allocation})")
        self.what, self.allocation = what, allocation


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 5e-5                          # peak learning rate
    schedule: str = "constant"                # after warm-up: "constant" or "cosine" (down to min_lr)
    warmup_steps: int = 0                     # linear warm-up from lr / warmup_steps to lr
    min_lr: float = 0.0                       # where the cosine ends
    grad_clip: Optional[float] = None         # max global gradient norm; None or 0: no clipping
    eval_freq: int = 5                        # evaluate every eval_freq steps
    eval_iter: int = 5                        # batches per evaluation, of each set
    patience: Optional[int] = None            # stop after this many evaluations without a better val loss
    max_steps: Optional[int] = None           # stop after this many steps in total (bounds a run)
    checkpoint_every: Optional[int] = None    # steps between checkpoints; None: at every evaluation

    def __post_init__(self):
        positive = ["epochs", "eval_freq", "eval_iter"] + [
            name for name in ("patience", "max_steps", "checkpoint_every") if getattr(self, name) is not None]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ValueError(f"min_lr must be a finite number >= 0, got {self.min_lr}")
        if self.schedule == "cosine" and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"the cosine schedule needs 0 <= min_lr <= lr, got min_lr {self.min_lr}, "
                             f"lr {self.lr}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be a finite number >= 0 (0: off), got {self.grad_clip}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def new_history():
    """One list per quantity, one entry per evaluation."""
    return {"steps": [], "epochs": [], "tokens_seen": [], "train_loss": [], "val_loss": [], "lr": []}


@dataclasses.dataclass
class TrainState:
    """Where a run stands after its last completed step; a checkpoint saves all of it."""
    step: int = 0                                  # optimizer steps done
    tokens_seen: int = 0
    history: dict = dataclasses.field(default_factory=new_history)
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0
    stopped_early: bool = False
    loader_state: Optional[dict] = None            # training loader position after the last step
    dropout_rng_state: Optional[dict] = None       # model.dropout_rng after the last step
    data_fingerprint: Optional[dict] = None        # of the data trained on (data.data_fingerprint)

    def remember_position(self, loader, model):
        """Snapshot the loader and dropout RNG after a completed step. Checkpoints save the snapshot, so
        one written mid-step (on Ctrl-C, with the next batch already drawn) still matches the weights."""
        self.loader_state = loader.state_dict()
        self.dropout_rng_state = model.dropout_rng.bit_generator.state


class BestWeights:
    """Keeps the weights with the lowest validation loss so far, in memory (a run keeps them in a file
    instead: minigpt.files.checkpoint.BestWeightsFile, or the adapters alone with LoRA)."""

    def __init__(self):
        self.arrays = None

    def save(self, model):
        self.arrays = {name: value.copy() for name, value in model.state_dict().items()}

    def restore(self, model):
        model.load_state_dict(self.arrays)


# ---------------------------------------------------------------------------------------------
# Schedule, evaluation, progress

def learning_rate(step, config, total_steps):
    """The learning rate of update number `step` (0-based) out of `total_steps`.

    Warm-up, W = warmup_steps, for step < W:  lr * (step + 1) / W
    then constant:  lr
    or cosine:      min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (step - W) / (total_steps - W)
    so the cosine starts at lr right after warm-up and reaches min_lr at step = total_steps.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lm_loss(model, batch):
    """Fine-tuning's objective: the mean cross-entropy of a batch (inputs, targets); no other metric."""
    return model.loss(batch.inputs, batch.targets), {}    # (B, T), (B, T) -> scalar


def calc_metrics_loader(model, loader, num_batches=None, objective=lm_loss, per_example=False):
    """{"loss": mean batch loss, and the mean of each of the objective's metrics} over the first
    `num_batches` batches (all if None) of the loader's dataset in order: the same batches every call,
    and the loader itself does not move. None when there is no batch: no loss (rather than NaN, which
    JSON cannot hold and divergence would mean).

    Each batch counts once, as in rasbt's calc_loss_loader; with `per_example` (for batches that know
    their number of examples, `.size`: a PreferenceBatch's pairs) each batch's means are weighted by it,
    so each example counts once and a short last batch counts for what it holds."""
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    if num_batches == 0:
        return None
    totals, weight_sum = {}, 0
    with no_grad():
        for i, batch in enumerate(in_order(loader)):
            if i == num_batches:
                break
            loss, metrics = objective(model, batch)
            weight = batch.size if per_example else 1
            for name, value in {"loss": float(loss.data), **metrics}.items():
                totals[name] = totals.get(name, 0.0) + value * weight
            weight_sum += weight
    return {name: total / weight_sum for name, total in totals.items()}


def calc_loss_loader(model, loader, num_batches=None):
    """The mean cross-entropy over the first `num_batches` batches, as calc_metrics_loader; None without."""
    metrics = calc_metrics_loader(model, loader, num_batches)
    return None if metrics is None else metrics["loss"]


def evaluate_model(model, train_loader, val_loader, eval_iter, objective=lm_loss):
    """(train metrics, val metrics) over `eval_iter` batches each (calc_metrics_loader), in eval mode
    (no dropout)."""
    with eval_mode(model):
        return (calc_metrics_loader(model, train_loader, eval_iter, objective),
                calc_metrics_loader(model, val_loader, eval_iter, objective))


def in_order(loader):
    """A copy of `loader` that reads its dataset in order, with a position and RNG of its own."""
    return DataLoader(loader.dataset, loader.batch_size)


def format_duration(seconds):
    """45s, 3m12s, 2h05m: an ETA or a time taken, at a glance."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def epochs_completed(loader):
    """Full passes the loader has made over its dataset."""
    position = loader.state_dict()
    finished = position["batches_done"] >= position["num_batches"]
    return position["epoch"] if finished else max(0, position["epoch"] - 1)


def epoch_progress(loader):
    """Epochs seen as a fraction: 1.25 is a quarter into the second epoch."""
    position = loader.state_dict()
    if position["epoch"] == 0:
        return 0.0
    return position["epoch"] - 1 + position["batches_done"] / position["num_batches"]


@contextlib.contextmanager
def deferred_interrupt():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it when the block is done, so an
    update is applied completely or not at all. Only the main thread receives signals; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def all_or_nothing(what):
    """A block that changes the weights, Adam's state and the TrainState together (`what`: "the update of
    step 7", "the record of the evaluation at step 5"): a Ctrl-C waits until it is done
    (deferred_interrupt), and a MemoryError inside it is raised as HalfApplied, so that the run is not
    saved from what it left."""
    with deferred_interrupt():
        try:
            yield
        except MemoryError as e:
            raise HalfApplied(what, " ".join(str(e).split()) or "MemoryError") from None


# ---------------------------------------------------------------------------------------------
# The loop

# Overflow on the way to a non-finite loss is reported once, as TrainingDiverged, not as NumPy warnings.
@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def train(model, optimizer, train_loader, val_loader, config, state=None, checkpoint=None, best=None,
          on_step=None, on_epoch_end=None, log=print, objective=lm_loss, suspects=(), memory_advice=None):
    """Train until config.epochs epochs, config.max_steps steps or early stopping; return the TrainState
    (its `.history` holds the evaluations).

    state: a TrainState restored from a checkpoint, to continue a run (None: start).
    checkpoint: what saves the run, any object with `.path` and save(model, optimizer, state)
        (minigpt.files.checkpoint.CheckpointFile), called at every evaluation or every
        config.checkpoint_every steps, at the end, and on Ctrl-C before re-raising; None: never saved.
    best: what keeps the weights of the lowest validation loss, any object with save(model) and
        restore(model) (and `.path` when it keeps them in a file); default BestWeights(), in memory.
        When early stopping ends the run, the model is left holding them.
    on_step(state), on_epoch_end(state): called after every step and after every epoch.
    objective: objective(model, batch) -> (loss, metrics), see the module docstring; default lm_loss.
    suspects: settings besides the learning rate that can make the loss diverge, as a user would change
        them ("--beta (now 0.1)"): a divergence names them with the learning rate and clipping.
    memory_advice: what would need less memory ("--lora-rank 16 needs about 13.0 GB"), for OutOfMemory's
        message.
    """
    if len(train_loader) == 0:
        raise ValueError("the training loader yields no batches: fewer training examples than one batch")
    state = state if state is not None else TrainState()
    if state.loader_state is None:  # a fresh start: the position before the first step
        state.remember_position(train_loader, model)
    total_steps = config.epochs * len(train_loader)
    best = best if best is not None else BestWeights()
    evaluator = Evaluator(model, train_loader, val_loader, config, total_steps, best, log, objective)
    saved_step = None
    resumed_step = state.step or None  # what a resumed run's checkpoint holds until the next save

    def save():
        nonlocal saved_step
        if checkpoint is not None and saved_step != state.step:
            check_finite_weights(model, state.step)
            checkpoint.save(model, optimizer, state)
            saved_step = state.step

    model.train()
    ran_out = None
    try:
        evaluator.evaluate_if_due(state)  # the initial losses, or an evaluation Ctrl-C cut short
        while not training_done(state, config, train_loader):
            for batch in train_loader:
                optimizer.zero_grad()
                loss, _ = objective(model, batch)          # lm_loss: (B, T), (B, T) -> scalar
                check_finite_loss("training loss of", state.step + 1, float(loss.data))
                loss.backward()
                with all_or_nothing(f"the update of step {state.step + 1}"):  # and its bookkeeping
                    if config.grad_clip:
                        clip_grad_norm(optimizer.params, config.grad_clip)
                    optimizer.lr = learning_rate(state.step, config, total_steps)
                    optimizer.step()
                    state.step += 1
                    state.tokens_seen += batch.inputs.size  # B * T
                    state.remember_position(train_loader, model)
                if on_step is not None:
                    on_step(state)
                evaluated = evaluator.evaluate_if_due(state)
                every = config.checkpoint_every
                if (every is None and evaluated) or (every is not None and state.step % every == 0):
                    save()
                epoch_finished = state.loader_state["batches_done"] == state.loader_state["num_batches"]
                if epoch_finished and on_epoch_end is not None:
                    on_epoch_end(state)
                if training_done(state, config, train_loader):
                    break
        save()
    except KeyboardInterrupt:
        if checkpoint is not None:
            save()
            log(f"\ninterrupted: step {state.step} is saved in {checkpoint.path}")
        raise
    except TrainingDiverged as e:
        kept, kept_step = "", saved_step if saved_step is not None else resumed_step
        if checkpoint is not None and kept_step is not None:
            kept += f"; {checkpoint.path} keeps step {kept_step}"
        if getattr(best, "path", None) is not None and state.best_step is not None:
            kept += f"; {best.path} keeps the best weights (step {state.best_step})"
        remedies = [f"lower the learning rate (--lr, now {config.lr:g})",
                    f"clip the gradient norm (--grad-clip, now {config.grad_clip or 'off'})",
                    *(f"lower {suspect}" for suspect in suspects)]
        advice = ", ".join(remedies[:-1]) + f" or {remedies[-1]}"
        raise TrainingDiverged(f"training diverged: {e}; {advice}{kept}") from None
    except HalfApplied as e:  # handled below, once this clause has let go of the frames and their activations
        ran_out = (f"in {e.what}", e.allocation, True)
    except MemoryError as e:
        ran_out = (f"after step {state.step}", " ".join(str(e).split()) or "MemoryError", False)
    if ran_out is not None:
        where, allocation, half_applied = ran_out
        optimizer.zero_grad()  # the gradients are not saved: their memory goes before the checkpoint's writes
        if not half_applied:
            with contextlib.suppress(MemoryError):  # a failed write leaves the previous checkpoint (atomic)
                save()
        kept_step = saved_step if saved_step is not None else resumed_step
        kept = ("nothing is saved" if checkpoint is None or kept_step is None else
                f"{checkpoint.path} keeps step {kept_step}")
        if half_applied:
            kept = f"nothing is saved from memory, which it may have left half changed; {kept}"
        raise OutOfMemory(f"out of memory {where} ({allocation}); {kept}"
                          + (f"; {memory_advice}" if memory_advice else ""))
    if state.stopped_early:
        evaluator.best.restore(model)
        log(f"early stopping: no lower validation loss in {config.patience} evaluations; "
            f"restored the weights of step {state.best_step} (val loss {state.best_val_loss:.3f})")
    return state


def _number(value, name="loss"):
    """A loss or metric for a progress line: 3 decimals, or n/a (no batch to evaluate)."""
    if isinstance(value, dict):
        value = value.get(name)
    return "n/a" if value is None else f"{value:.3f}"


def check_finite_loss(what, step, loss):
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the {what} step {step} is {loss}")


def check_finite_weights(model, step):
    for name, p in model.named_parameters(trainable_only=True):  # frozen weights never change
        if non_finite(p.data) is not None:
            raise TrainingDiverged(f"the weights hold non-finite values after step {step} ({name})")


def training_done(state, config, train_loader):
    return (state.stopped_early or epochs_completed(train_loader) >= config.epochs
            or (config.max_steps is not None and state.step >= config.max_steps))


class Evaluator:
    """Evaluates when due, records the history, keeps the best weights, decides early stopping, and
    prints a progress line (losses, tokens seen, time per step, ETA)."""

    def __init__(self, model, train_loader, val_loader, config, total_steps, best, log=print,
                 objective=lm_loss):
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.config, self.best, self.log, self.objective = config, best, log, objective
        self.total_steps = total_steps
        self.last_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
        self.mark = None  # (time, step) of the previous evaluation in this process: s/step and ETA

    def evaluate_if_due(self, state):
        """At step 0, every eval_freq steps and after the last epoch, once each; True if it evaluated."""
        history, config = state.history, self.config
        recorded = bool(history["steps"]) and history["steps"][-1] == state.step
        at_end = epochs_completed(self.train_loader) >= config.epochs
        if recorded or not (state.step % config.eval_freq == 0 or at_end):
            if self.mark is None:
                self.mark = (time.monotonic(), state.step)
            return False
        train_metrics, val_metrics = evaluate_model(self.model, self.train_loader, self.val_loader,
                                                    config.eval_iter, self.objective)
        train_loss, val_loss = (None if m is None else m["loss"] for m in (train_metrics, val_metrics))
        for which, loss in (("training", train_loss), ("validation", val_loss)):
            if loss is not None:
                check_finite_loss(f"{which} loss after", state.step, loss)
        # history, best weights and early stopping change together
        with all_or_nothing(f"the record of the evaluation at step {state.step}"):
            self.record(state, train_metrics, val_metrics)
        now = time.monotonic()
        train_text, val_text = (_number(loss) for loss in (train_loss, val_loss))
        shown = "".join(f", {name.replace('_', ' ')} train {_number(train_metrics, name)} / val "
                        f"{_number(val_metrics, name)}" for name in getattr(self.objective, "printed", ()))
        if self.mark is None or self.mark[1] == state.step:
            label = "initial losses" if state.step == 0 else "losses"  # else: resumed mid-evaluation
            self.log(f"{label} (step {state.step}): train {train_text}, val {val_text}{shown}")
        else:
            seconds_per_step = (now - self.mark[0]) / (state.step - self.mark[1])
            eta = format_duration(seconds_per_step * max(0, self.last_step - state.step))
            self.log(f"ep {max(1, state.loader_state['epoch'])} (step {state.step:06d}): "
                     f"train loss {train_text}, val loss {val_text}{shown}, tokens seen "
                     f"{state.tokens_seen:,}, {seconds_per_step:.2f} s/step, ETA {eta}")
        self.mark = (now, state.step)
        return True

    def record(self, state, train_metrics, val_metrics):
        """Append one evaluation; a lower val loss saves the best weights, else patience runs down.
        Without a validation loss (no validation batch: None) there is neither. Metrics other than the
        loss go to history["train_<name>"] and ["val_<name>"]."""
        history = state.history
        history["steps"].append(state.step)
        history["epochs"].append(epoch_progress(self.train_loader))
        history["tokens_seen"].append(state.tokens_seen)
        for split, metrics in (("train", train_metrics), ("val", val_metrics)):
            for name, value in (metrics or {"loss": None}).items():
                history.setdefault(f"{split}_{name}", []).append(value)
        history["lr"].append(learning_rate(max(0, state.step - 1), self.config, self.total_steps))
        val_loss = None if val_metrics is None else val_metrics["loss"]
        if val_loss is None:
            return
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            check_finite_weights(self.model, state.step)
            state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
            self.best.save(self.model)
        else:
            state.evals_since_best += 1
            patience = self.config.patience
            state.stopped_early = patience is not None and state.evals_since_best >= patience
