"""Run folders: one run at a time in each, and no leftovers of writes a kill cut short.

    with runfolder.claim(run_dir, resume=False, checkpoint_name="checkpoint.npz"):
        ...  # load data and model, train, write the run files

`claim` makes the folder (and any missing parents) and creates a lock file in it with O_EXCL, which
the operating system lets exactly one process do, so two runs started together into one folder
cannot both proceed: the second gets a one-line error naming the first. The lock holds the owner's
pid, host and start time. A lock whose process no longer exists (same host, pid gone: a run that was
killed) is stale and is taken over with a note. Under the claim, and only there, temporary files of
interrupted atomic writes (fileio.remove_temp_files) are deleted, since no other process writes in
the folder. The lock is removed when the block ends, however it ends (an error, Ctrl-C); folders the
claim made that are still empty then are removed too.

What the folder must hold: a new run needs a folder without a checkpoint (one that a run left before
its first checkpoint is free again); --resume needs one with a checkpoint.
"""
import contextlib
import json
import os
import socket
import time
from pathlib import Path

from .fileio import parse_json, remove_temp_files

LOCK_NAME = ".run.lock"


@contextlib.contextmanager
def claim(run_dir, resume=False, checkpoint_name="checkpoint.npz", log=print):
    """Hold `run_dir` for one run (see the module docstring); ValueError when it is not free."""
    run_dir = Path(run_dir)
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    try:
        _create_lock(lock, log)
        try:
            _check_contents(run_dir, resume, checkpoint_name, log)
            yield run_dir
        finally:
            lock.unlink(missing_ok=True)
    finally:
        for folder in made:  # deepest first; a folder that got files stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def _create_lock(lock, log):
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a stale lock is removed once, then created again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if not _is_stale(holder):
                raise ValueError(_in_use(lock, holder)) from None
            log(f"note: {lock.parent} was claimed by process {holder['pid']}, which no longer exists; "
                f"taking it over")
            lock.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(owner))
        except BaseException:  # includes Ctrl-C: never leave an empty lock behind
            lock.unlink(missing_ok=True)
            raise
        return
    raise ValueError(_in_use(lock, _read_lock(lock)))  # another run took it over first


def _read_lock(lock, tries=10):
    """The lock's owner ({"pid", "host", "started"}), or None when it cannot be read. A lock is empty for
    the moment between its creation and its write, so an unreadable one is read again a few times."""
    for _ in range(tries):
        try:
            holder = parse_json(lock.read_bytes(), lock)
        except (OSError, ValueError):
            holder = None
        if (isinstance(holder, dict) and isinstance(holder.get("pid"), int)
                and isinstance(holder.get("host"), str)):
            return holder
        time.sleep(0.05)
    return None


def _is_stale(holder):
    """Whether the lock's process is gone; only decidable on its own host."""
    if holder is None or holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def _in_use(lock, holder):
    who = ("an unknown process" if holder is None else
           f"process {holder['pid']} on {holder['host']}, started {holder.get('started', '?')}")
    return (f"{lock.parent} is in use by another run ({who}); wait for it to finish or choose another "
            f"--out-dir (if no run is using it, delete {lock})")


def _check_contents(run_dir, resume, checkpoint_name, log):
    removed = remove_temp_files(run_dir)
    if removed:
        log(f"removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} of interrupted writes "
            f"in {run_dir}")
    if resume:
        require_checkpoint(run_dir, checkpoint_name)
    elif (run_dir / checkpoint_name).is_file():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                         f"or choose another --out-dir")
    elif (run_dir / "config.json").is_file():
        log(f"note: the run in {run_dir} stopped before its first checkpoint; starting it again from the "
            f"beginning")


def require_checkpoint(run_dir, checkpoint_name="checkpoint.npz"):
    """Raise FileNotFoundError unless `run_dir` holds a checkpoint to resume from."""
    if not (run_dir / checkpoint_name).is_file():
        started = (run_dir / "config.json").is_file()
        stopped = (" (the run in it stopped before its first checkpoint, so the folder is free for a new run "
                   "with the same --out-dir)" if started else ": is it a run folder?")
        raise FileNotFoundError(f"no checkpoint at {run_dir / checkpoint_name}{stopped}")
