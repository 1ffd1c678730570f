"""Run folders: claimed by one run at a time, free again after a run that never reached a checkpoint,
cleaned of interrupted writes; --name stays under runs/; Ctrl-C during start-up is one line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import train
from minigpt.files import runfolder
from minigpt.pipeline import sft_run, steps

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--n-train", "24", "--n-val", "4",
        "--n-test", "5", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "4",
        "--max-steps", "2"]


def write_lock(run_dir, pid, host=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / runfolder.LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))
    return lock


def finished_pid():
    """The pid of a process that has exited (and been reaped): no process has it now."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_folder_claimed_by_a_live_run_is_refused_and_left_alone(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            lock = write_lock(run_dir, other.pid)
            assert train.main(TINY + ["--out-dir", str(run_dir)]) == 2
        finally:
            other.kill()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"in use by another run (process {other.pid} on {socket.gethostname()}" in err
    assert lock.is_file() and sorted(p.name for p in run_dir.iterdir()) == [runfolder.LOCK_NAME]


def test_a_lock_of_another_host_is_refused_with_a_hint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_lock(run_dir, 1, host="elsewhere.example")
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "process 1 on elsewhere.example" in err and f"delete {run_dir / runfolder.LOCK_NAME}" in err


def test_a_stale_claim_is_taken_over_with_a_note_and_released_at_the_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    pid = finished_pid()
    write_lock(run_dir, pid)
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"claimed by process {pid}, which no longer exists" in out
    assert not (run_dir / runfolder.LOCK_NAME).exists() and (run_dir / "metrics.json").is_file()


def test_the_claim_is_taken_before_data_and_model_are_loaded(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    seen = []

    def load_splits(*args):  # the first step of loading: the folder must be ours by now
        seen.append(json.loads((run_dir / runfolder.LOCK_NAME).read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_run, "load_splits", load_splits)
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 130
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not run_dir.exists()  # released, and the folder it made is gone again


def test_ctrl_c_during_start_up_is_one_line_and_releases_the_claim(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(steps, "set_dropout", interrupted)  # while the model is being made
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n" and "Traceback" not in captured.out
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []  # a folder it did not make stays


def test_two_processes_started_together_never_share_a_folder(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py")] + TINY + ["--out-dir", str(run_dir)]
    runs = [subprocess.Popen(command + ["--seed", str(seed)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(run.wait(timeout=120), run.stdout.read(), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    loser_err = results[1 - winner][2]
    assert "Traceback" not in loser_err and loser_err.count("\n") == 1
    assert "in use by another run" in loser_err or "already holds a run" in loser_err
    assert json.loads((run_dir / "config.json").read_text())["seed"] == winner + 1


def test_a_run_that_died_before_its_first_checkpoint_leaves_a_free_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")                      # written at start-up
    leftovers = [run_dir / ".model-best.npz.k2j4_x9a.tmp", run_dir / ".checkpoint.npz.abcd1234.tmp"]
    for path in leftovers:                                          # writes cut short by a kill
        path.write_bytes(b"half")
    keep = run_dir / "notes.tmp"                                    # not a name atomic_write makes
    keep.write_text("mine")
    assert train.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "stopped before its first checkpoint" in err
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "removed 2 temporary files of interrupted writes" in out
    assert "stopped before its first checkpoint; starting it again" in out
    assert not any(path.exists() for path in leftovers) and keep.read_text() == "mine"
    assert (run_dir / "checkpoint.npz").is_file()
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 2      # now it holds a run
    assert "already holds a run" in capsys.readouterr().err


def test_temporary_files_are_cleaned_when_a_run_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(TINY + ["--out-dir", str(run_dir)]) == 0
    (run_dir / "model-final-hf").mkdir()
    leftover = run_dir / "model-final-hf" / ".model.safetensors.a1b2c3d4.tmp"
    leftover.write_bytes(b"half")
    assert train.main(["--resume", str(run_dir), "--max-steps", "3"]) == 0
    assert not leftover.exists()
    assert "removed 1 temporary file of interrupted writes" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", ".", ""])
def test_a_run_name_is_one_folder_under_runs(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + ["--name", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: name must be one folder name") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_imports_in_a_real_process_is_one_line(tmp_path):
    """train.py imports NumPy, tiktoken and matplotlib first; a Ctrl-C then is one line, exit 130."""
    script = (f"import signal, sys, runpy; sys.argv = ['train.py', '--help']; "
              f"import builtins; real = builtins.__import__\n"
              f"def interrupting(name, *args, **kwargs):\n"
              f"    if name.split('.')[0] == 'minigpt': raise KeyboardInterrupt\n"
              f"    return real(name, *args, **kwargs)\n"
              f"builtins.__import__ = interrupting\n"
              f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", "")
