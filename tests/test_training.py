"""The training loop: learning, the schedule, early stopping, exact resume, Ctrl-C, atomic checkpoints."""
import math
import os
import signal

import numpy as np
import numpy.lib.format
import pytest

from minigpt import GPTConfig, GPTModel, is_grad_enabled, training
from minigpt.files.checkpoint import (BestWeightsFile, CheckpointFile, read_checkpoint, restore_checkpoint,
                                      save_checkpoint)
from minigpt.training import TrainState
from minigpt.data import InstructionDataset
from minigpt.loader import DataLoader
from minigpt.files.fileio import write_json
from minigpt.optim import AdamW
from minigpt.tasks import make_task_splits
from minigpt.tokenizer import byte_tokenizer
from minigpt.training import TrainConfig, calc_loss_loader, deferred_interrupt, learning_rate, train

TINY = GPTConfig(vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=1)


def quiet(*args, **kwargs):
    pass


def setup(n_train=16, batch_size=4, drop_rate=0.1, lr=3e-3, seed=0):
    """A tiny model, its optimizer and loaders over the task dataset (byte tokenizer, phi3, masked)."""
    train_entries, val_entries, _ = make_task_splits(seed=0, n_train=n_train, n_val=4, n_test=1)
    tokenizer = byte_tokenizer()
    train_set = InstructionDataset(train_entries, tokenizer, "phi3", mask_prompt=True)
    train_loader = DataLoader(train_set, batch_size, shuffle=True, drop_last=True, seed=seed)
    val_loader = DataLoader(InstructionDataset(val_entries, tokenizer, "phi3", mask_prompt=True), batch_size)
    model = GPTModel(GPTConfig(**{**TINY.__dict__, "drop_rate": drop_rate}), seed=seed)
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    return model, optimizer, train_loader, val_loader


# Warm-up, cosine, clipping, dropout and several epochs: every piece of state a resume must restore.
RESUME_CONFIG = dict(epochs=3, lr=3e-3, schedule="cosine", warmup_steps=2, min_lr=3e-4, grad_clip=1.0,
                     eval_freq=2, eval_iter=2)


def assert_same_run(model_a, optimizer_a, state_a, model_b, optimizer_b, state_b):
    assert state_a.history == state_b.history
    assert (state_a.step, state_a.tokens_seen) == (state_b.step, state_b.tokens_seen)
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert np.array_equal(a, b), name
    for a, b in zip(optimizer_a.exp_avg + optimizer_a.exp_avg_sq,
                    optimizer_b.exp_avg + optimizer_b.exp_avg_sq):
        assert np.array_equal(a, b)
    assert optimizer_a.steps == optimizer_b.steps


def copy_weights(model):
    return {name: value.copy() for name, value in model.state_dict().items()}


def uninterrupted_run():
    model, optimizer, train_loader, val_loader = setup()
    state = train(model, optimizer, train_loader, val_loader, TrainConfig(**RESUME_CONFIG), log=quiet)
    return model, optimizer, state


# ---------------------------------------------------------------------------------------------
# Learning and the schedule

def test_a_few_steps_lower_the_loss_and_count_input_tokens():
    model, optimizer, train_loader, val_loader = setup(n_train=8, drop_rate=0.0, lr=1e-2)
    before = calc_loss_loader(model, train_loader)
    seen = []
    state = train(model, optimizer, train_loader, val_loader,
                  TrainConfig(epochs=10, lr=1e-2, eval_freq=5, eval_iter=2), log=quiet,
                  on_step=lambda s: seen.append(s.tokens_seen))
    assert calc_loss_loader(model, train_loader) < before - 1.0
    assert state.step == 20 and state.history["steps"] == [0, 5, 10, 15, 20]
    assert state.history["epochs"] == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert state.history["val_loss"][-1] < state.history["val_loss"][0]
    widths = np.diff([0] + seen)
    assert all(w % 4 == 0 for w in widths) and state.tokens_seen == seen[-1]  # B * T per step


def test_learning_rate_warmup_then_constant_or_cosine():
    cosine = TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr=1e-4)
    assert learning_rate(0, cosine, 110) == pytest.approx(1e-4)       # lr / W: the first step moves
    assert learning_rate(4, cosine, 110) == pytest.approx(5e-4)
    assert learning_rate(9, cosine, 110) == pytest.approx(1e-3)       # warm-up ends at the peak
    assert learning_rate(10, cosine, 110) == pytest.approx(1e-3)      # the cosine starts there
    assert learning_rate(60, cosine, 110) == pytest.approx(5.5e-4)    # halfway: the mean of both ends
    assert learning_rate(110, cosine, 110) == pytest.approx(1e-4)     # and ends at min_lr
    assert learning_rate(500, cosine, 110) == pytest.approx(1e-4)
    constant = TrainConfig(lr=5e-5)
    assert {learning_rate(s, constant, 100) for s in (0, 50, 99)} == {5e-5}
    rates = [learning_rate(s, cosine, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("bad", [dict(lr=0), dict(lr=-1), dict(epochs=0), dict(eval_freq=0),
                                 dict(schedule="linear"), dict(min_lr=1.0, lr=0.1, schedule="cosine"),
                                 dict(patience=0),
                                 dict(warmup_steps=-1), dict(grad_clip=-1.0), dict(lr=math.inf),
                                 dict(lr=math.nan), dict(grad_clip=math.nan), dict(min_lr=math.nan)])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


# ---------------------------------------------------------------------------------------------
# Early stopping

@pytest.mark.parametrize("on_disk", [False, True])
def test_early_stopping_stops_and_keeps_the_best_weights(monkeypatch, tmp_path, on_disk):
    val_losses = iter([5.0, 4.0, 3.0, 3.5, 3.2, 2.0])  # best at step 2, then two evaluations without
    monkeypatch.setattr(training, "evaluate_model", lambda *args: ({"loss": 1.0}, {"loss": next(val_losses)}))
    model, optimizer, train_loader, val_loader = setup()
    weights_at = {}
    best_path = tmp_path / "best.npz" if on_disk else None
    state = train(model, optimizer, train_loader, val_loader,
                  TrainConfig(epochs=5, lr=1e-2, eval_freq=1, patience=2), log=quiet,
                  best=BestWeightsFile(best_path) if on_disk else None,
                  on_step=lambda s: weights_at.update({s.step: copy_weights(model)}))
    assert state.stopped_early and state.step == 4 and state.history["steps"] == [0, 1, 2, 3, 4]
    assert (state.best_step, state.best_val_loss) == (2, 3.0)
    for name, value in model.state_dict().items():
        assert np.array_equal(value, weights_at[2][name]), name
    assert not np.array_equal(model.state_dict()["wte.weight"], weights_at[4]["wte.weight"])
    assert best_path is None or best_path.is_file()


# ---------------------------------------------------------------------------------------------
# Exact resume

def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tmp_path):
    model_a, optimizer_a, state_a = uninterrupted_run()
    assert state_a.step == 12 and len(state_a.history["steps"]) == 7
    checkpoint = tmp_path / "checkpoint.npz"
    for stop_at in (5, None):  # a bounded run to step 5 (mid-epoch), then resumed to the end
        model_b, optimizer_b, train_loader, val_loader = setup(seed=0)
        state = None if stop_at else restore_checkpoint(checkpoint, model_b, optimizer_b, train_loader)
        state_b = train(model_b, optimizer_b, train_loader, val_loader,
                        TrainConfig(**RESUME_CONFIG, max_steps=stop_at), state=state,
                        checkpoint=CheckpointFile(checkpoint, {"note": "kept"}), log=quiet)
        if stop_at is not None:
            assert state_b.step == 5 and read_checkpoint(checkpoint)["train_state"]["step"] == 5
    assert read_checkpoint(checkpoint)["run_config"] == {"note": "kept"}
    assert_same_run(model_a, optimizer_a, state_a, model_b, optimizer_b, state_b)


@pytest.mark.parametrize("where", ["after a step", "inside the forward pass"])
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, where):
    model_a, optimizer_a, state_a = uninterrupted_run()
    model, optimizer, train_loader, val_loader = setup()
    checkpoint = tmp_path / "checkpoint.npz"
    messages = []
    training_calls = []
    loss = model.loss

    def interrupt_the_8th_step(inputs, targets):  # evaluation runs without grad: let it through
        if is_grad_enabled():
            training_calls.append(1)
            if len(training_calls) == 8:
                raise KeyboardInterrupt
        return loss(inputs, targets)

    def interrupt_after_step_7(state):
        if state.step == 7:
            raise KeyboardInterrupt

    if where == "inside the forward pass":
        monkeypatch.setattr(model, "loss", interrupt_the_8th_step)
    with pytest.raises(KeyboardInterrupt):
        train(model, optimizer, train_loader, val_loader, TrainConfig(**RESUME_CONFIG),
              checkpoint=CheckpointFile(checkpoint), log=messages.append,
              on_step=interrupt_after_step_7 if where == "after a step" else None)
    assert read_checkpoint(checkpoint)["train_state"]["step"] == 7  # the last complete step
    assert "interrupted" in messages[-1] and str(checkpoint) in messages[-1]

    model_b, optimizer_b, train_loader, val_loader = setup()
    state = restore_checkpoint(checkpoint, model_b, optimizer_b, train_loader)
    state_b = train(model_b, optimizer_b, train_loader, val_loader, TrainConfig(**RESUME_CONFIG),
                    state=state, log=quiet)
    assert_same_run(model_a, optimizer_a, state_a, model_b, optimizer_b, state_b)


def test_ctrl_c_is_held_until_the_update_is_complete():
    reached_the_end = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            reached_the_end = True
    assert reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


# ---------------------------------------------------------------------------------------------
# Checkpoint files

def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    model, optimizer, train_loader, val_loader = setup()
    state = train(model, optimizer, train_loader, val_loader, TrainConfig(max_steps=2, eval_freq=100),
                  log=quiet)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, model, optimizer, state)
    save_checkpoint(path, model, optimizer, state)  # replaces the old file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]
    old = path.read_bytes()
    write_array = numpy.lib.format.write_array

    def fail_midway(fp, array, *args, **kwargs):
        write_array(fp, array[:1], *args, **kwargs)  # some bytes reach the file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(numpy.lib.format, "write_array", fail_midway)
    model.wte.weight.data += 1.0
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, optimizer, state)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]


def test_checkpoint_is_plain_arrays_and_json(tmp_path):
    model, optimizer, train_loader, val_loader = setup()
    state = train(model, optimizer, train_loader, val_loader, TrainConfig(max_steps=3, eval_freq=2),
                  checkpoint=CheckpointFile(tmp_path / "c.npz"), log=quiet)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as archive:  # no pickled objects inside
        names = set(archive.files)
        assert {f"model/{name}" for name in model.state_dict()} <= names
        assert "optimizer/exp_avg/0" in names and "optimizer/exp_avg_sq/0" in names
    meta = read_checkpoint(tmp_path / "c.npz")
    assert meta["model_config"] == TINY.__dict__ | {"drop_rate": 0.1}
    assert meta["train_state"]["history"] == state.history
    assert meta["optimizer"]["steps"] == optimizer.steps
    assert math.isclose(meta["optimizer"]["lr"], optimizer.lr)
    assert meta["train_state"]["dropout_rng_state"] == model.dropout_rng.bit_generator.state


def test_restoring_into_a_different_model_or_a_missing_file_fails_clearly(tmp_path):
    model, optimizer, train_loader, val_loader = setup()
    save_checkpoint(tmp_path / "c.npz", model, optimizer, TrainState())
    other = GPTModel(GPTConfig(vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=2))
    with pytest.raises(ValueError, match=r"c.npz: missing tensor h.1.ln_1.weight \(and \d+ more\)"):
        restore_checkpoint(tmp_path / "c.npz", other, AdamW(other.parameters()), train_loader)
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
        read_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not an .npz archive"):
        read_checkpoint(tmp_path / "bad.npz")


def test_a_damaged_checkpoint_entry_is_one_clear_error(tmp_path):
    model, optimizer, train_loader, _ = setup()
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, TrainState())
    data = bytearray(path.read_bytes())
    data[data.index(model.wte.weight.data.tobytes()[:64]) + 10] ^= 0xFF  # one damaged byte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"c.npz: damaged .npz archive \(entry 'model/wte.weight': Bad CRC"):
        restore_checkpoint(path, model, optimizer, train_loader)


# ---------------------------------------------------------------------------------------------
# Divergence: stop at the first non-finite loss, never save non-finite weights

def test_a_nan_training_loss_stops_the_run_before_its_update(tmp_path, monkeypatch):
    model, optimizer, train_loader, val_loader = setup()
    calls, loss = [], GPTModel.loss

    def nan_at_step_4(self, inputs, targets):
        out = loss(self, inputs, targets)
        if self.training:
            calls.append(1)
            if len(calls) == 4:
                out.data = np.float32(np.nan) * out.data
        return out

    monkeypatch.setattr(GPTModel, "loss", nan_at_step_4)
    path = tmp_path / "c.npz"
    message = r"the training loss of step 4 is nan; lower the learning rate \(--lr, now 0.003\) or clip"
    with pytest.raises(training.TrainingDiverged, match=message) as info:
        train(model, optimizer, train_loader, val_loader, TrainConfig(**{**RESUME_CONFIG, "grad_clip": None}),
              checkpoint=CheckpointFile(path), log=quiet)
    assert "--grad-clip, now off" in str(info.value) and f"{path} keeps step 2" in str(info.value)
    assert read_checkpoint(path)["train_state"]["step"] == 2 and optimizer.steps[0] == 3  # no 4th update
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_a_nan_evaluation_loss_stops_the_run(monkeypatch):
    monkeypatch.setattr(training, "evaluate_model",
                        lambda model, *loaders: ({"loss": 1.0},
                                                 {"loss": 2.0 if model.step_count < 3 else math.inf}))
    model, optimizer, train_loader, val_loader = setup()
    model.step_count = 0
    with pytest.raises(training.TrainingDiverged, match=r"the validation loss after step 4 is inf; lower"):
        train(model, optimizer, train_loader, val_loader, TrainConfig(epochs=3, eval_freq=2), log=quiet,
              on_step=lambda state: setattr(model, "step_count", state.step))


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    model, optimizer, train_loader, val_loader = setup()

    def poison_an_unused_position(state):  # wpe's last row: no sequence is that long, the loss stays finite
        if state.step == 3:
            model.wpe.weight.data[-1] = np.nan

    path = tmp_path / "c.npz"
    with pytest.raises(training.TrainingDiverged,
                       match=r"the weights hold non-finite values after step 3 \(wpe.weight\)"):
        train(model, optimizer, train_loader, val_loader, TrainConfig(epochs=2, checkpoint_every=1),
              checkpoint=CheckpointFile(path), on_step=poison_an_unused_position, log=quiet)
    assert read_checkpoint(path)["train_state"]["step"] == 2


def test_an_empty_validation_loader_has_no_loss_rather_than_nan(tmp_path):
    model, optimizer, train_loader, _ = setup()
    empty = DataLoader(InstructionDataset([], byte_tokenizer(), "phi3"), batch_size=4)
    assert calc_loss_loader(model, empty) is None
    state = train(model, optimizer, train_loader, empty, TrainConfig(max_steps=2, eval_freq=1),
                  checkpoint=CheckpointFile(tmp_path / "c.npz"), log=quiet)
    assert state.history["val_loss"] == [None, None, None] and state.best_step is None
    assert read_checkpoint(tmp_path / "c.npz")["train_state"]["history"] == state.history


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_write_json_refuses_what_json_cannot_hold(tmp_path, value):
    with pytest.raises(ValueError, match=r"h.json: cannot write NaN or infinity as JSON"):
        write_json(tmp_path / "h.json", {"loss": [1.0, value]})
    assert list(tmp_path.iterdir()) == []
