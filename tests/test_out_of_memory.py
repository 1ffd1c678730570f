"""Memory running out during a run: one line, its own exit code, and a checkpoint that resumes.

The allocation failure is forced in-process: an op, the optimizer or the test responses raise NumPy's
kind of MemoryError at a chosen step.
"""
import weakref

import numpy as np
import pytest

import train
from minigpt import GPTModel, is_grad_enabled
from minigpt.files.checkpoint import CheckpointFile, read_checkpoint, restore_checkpoint
from minigpt.pipeline import steps
from minigpt.training import BestWeights, OutOfMemory, TrainConfig, train as train_loop
from test_train_cli import TINY, read
from test_training import RESUME_CONFIG, assert_same_run, quiet, setup, uninterrupted_run

ALLOCATION = "Unable to allocate 1.21 GiB for an array with shape (8, 92, 50257) and data type float32"


def test_running_out_in_a_step_saves_the_last_step_once_its_activations_are_gone(tmp_path):
    model_a, optimizer_a, state_a = uninterrupted_run()
    model, optimizer, train_loader, val_loader = setup()
    calls, graph = [], []
    loss = model.loss

    def run_out_in_the_8th_step(inputs, targets):  # evaluation runs without grad: let it through
        if is_grad_enabled():
            calls.append(1)
            if len(calls) == 8:
                hidden = model.hidden_states(inputs)  # the step's activations, held by this frame
                graph.append(weakref.ref(hidden))
                raise MemoryError(ALLOCATION)
        return loss(inputs, targets)

    class Checkpoint(CheckpointFile):
        def save(self, model, optimizer, state):
            if graph:  # the save after running out: the failed step's activations must be freed by then
                assert graph[0]() is None and all(p.grad is None for p in optimizer.params)
            super().save(model, optimizer, state)

    model.loss = run_out_in_the_8th_step
    checkpoint = tmp_path / "checkpoint.npz"
    with pytest.raises(OutOfMemory) as info:
        train_loop(model, optimizer, train_loader, val_loader, TrainConfig(**RESUME_CONFIG),
                   checkpoint=Checkpoint(checkpoint), log=quiet, memory_advice="--batch-size 2 needs less")
    assert str(info.value) == (f"out of memory after step 7 ({ALLOCATION}); {checkpoint} keeps step 7; "
                               f"--batch-size 2 needs less")
    assert read_checkpoint(checkpoint)["train_state"]["step"] == 7

    model_b, optimizer_b, train_loader, val_loader = setup()
    state = restore_checkpoint(checkpoint, model_b, optimizer_b, train_loader)
    state_b = train_loop(model_b, optimizer_b, train_loader, val_loader, TrainConfig(**RESUME_CONFIG),
                         state=state, log=quiet)
    assert_same_run(model_a, optimizer_a, state_a, model_b, optimizer_b, state_b)


@pytest.mark.parametrize("where", ["the update of step 7", "the record of the evaluation at step 6"])
def test_running_out_inside_an_update_saves_nothing_from_it(tmp_path, where):
    """What memory running out may leave half changed is not saved: the checkpoint of the evaluation
    before stays, and resumes."""
    model_a, optimizer_a, state_a = uninterrupted_run()
    model, optimizer, train_loader, val_loader = setup()
    step = optimizer.step

    def half_an_update():
        if optimizer.steps[0] == 6:                     # the 7th update
            optimizer.params[0].data += 1.0             # one parameter changed, then memory runs out
            raise MemoryError(ALLOCATION)
        step()

    class Best(BestWeights):
        def save(self, model):
            if optimizer.steps[0] == 6:                 # the evaluation at step 6 found a lower loss
                raise MemoryError(ALLOCATION)
            super().save(model)

    in_the_update = where.startswith("the update")
    if in_the_update:
        optimizer.step = half_an_update
    checkpoint = tmp_path / "checkpoint.npz"
    with pytest.raises(OutOfMemory) as info:
        train_loop(model, optimizer, train_loader, val_loader, TrainConfig(**RESUME_CONFIG),
                   checkpoint=CheckpointFile(checkpoint), best=None if in_the_update else Best(), log=quiet)
    kept = 6 if in_the_update else 4
    assert str(info.value) == (f"out of memory in {where} ({ALLOCATION}); nothing is saved from memory, "
                               f"which it may have left half changed; {checkpoint} keeps step {kept}")
    model_b, optimizer_b, train_loader, val_loader = setup()
    state = restore_checkpoint(checkpoint, model_b, optimizer_b, train_loader)
    assert state.step == kept
    state_b = train_loop(model_b, optimizer_b, train_loader, val_loader, TrainConfig(**RESUME_CONFIG),
                         state=state, log=quiet)
    assert_same_run(model_a, optimizer_a, state_a, model_b, optimizer_b, state_b)


def test_train_py_gives_one_line_and_exit_code_4_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    calls = []
    loss = GPTModel.loss

    def run_out_in_step_4(self, inputs, targets):
        if is_grad_enabled():
            calls.append(1)
            if len(calls) == 4:
                raise MemoryError(ALLOCATION)
        return loss(self, inputs, targets)

    monkeypatch.setattr(GPTModel, "loss", run_out_in_step_4)
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "6", "--out-dir", str(run_dir)]) == train.EXIT_OUT_OF_MEMORY == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: out of memory after step 3 ({ALLOCATION}); ")
    assert f"{run_dir / 'checkpoint.npz'} keeps step 3" in err  # saved after running out (eval_freq 2)
    assert "; the run was estimated at " in err and " available; --lora-rank 16 needs about " in err
    assert err.endswith(f"; continue the run with: python train.py --resume {run_dir}\n")
    monkeypatch.undo()
    assert train.main(["--resume", str(run_dir)]) == 0
    assert read(run_dir / "metrics.json")["steps"] == 6 and len(read(run_dir / "test-responses.json")) == 5
    assert "exit codes: " in train.build_parser().epilog and "4 out of memory" in train.build_parser().epilog


def test_running_out_in_the_test_responses_keeps_the_trained_run(tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError(ALLOCATION)

    monkeypatch.setattr(steps, "generate_responses", no_memory)
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "3", "--out-dir", str(run_dir)]) == 4
    err = capsys.readouterr().err
    assert err == (f"error: out of memory ({ALLOCATION}); {run_dir / 'checkpoint.npz'} keeps step 3; "
                   f"continue the run with: python train.py --resume {run_dir}\n")
    assert read_checkpoint(run_dir / "checkpoint.npz")["train_state"]["step"] == 3
    with np.load(run_dir / "model-final.npz") as written:
        final = dict(written)
    monkeypatch.undo()
    assert train.main(["--resume", str(run_dir)]) == 0       # training is done: only what follows runs
    assert read(run_dir / "metrics.json")["steps"] == 3 and len(read(run_dir / "test-responses.json")) == 5
    with np.load(run_dir / "model-final.npz") as written_again:
        assert all(np.array_equal(value, written_again[name]) for name, value in final.items())


def test_memory_running_out_outside_a_run_is_one_line_too(capsys, monkeypatch):
    def no_memory(config):
        raise MemoryError(ALLOCATION)

    monkeypatch.setattr(train.sft_run, "run", no_memory)
    assert train.main(TINY) == 4
    assert capsys.readouterr().err == f"error: out of memory ({ALLOCATION})\n"
