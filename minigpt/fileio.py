"""Files that are never half-written, .npz archives read safely, and resumable-safe downloads.

Everything minigpt writes (weights, checkpoints, run files, downloads) goes through `atomic_write`:
the bytes land in a temporary file beside the target, which is renamed over the target only once it
is complete. A crash or Ctrl-C leaves the old file (or no file), never a truncated one.
Everything it reads from an .npz goes through `open_npz`: nothing is ever unpickled, and a bad file
is one line naming it.
"""
import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; on a clean exit rename it to `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it normal permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:  # includes KeyboardInterrupt: never leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def parse_json(text, source, error=ValueError, **options):
    """json.loads for text read from a file -> the object; malformed input raises `error`, one line.

    `text` is a str or UTF-8 bytes; `source` names where it came from (a file, or part of one);
    `options` go to json.loads. json.loads recurses once per nesting level, so a few thousand '['
    would end in a RecursionError traceback: here that is one more kind of malformed input.
    """
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text, **options)
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise error(f"{source}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{source}: invalid JSON: nested too deeply to parse") from None


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@contextlib.contextmanager
def open_npz(path, error=ValueError, hint=""):
    """Open an .npz for reading without pickle -> NpzArchive (`.files`, `archive[name]`).

    A missing file raises FileNotFoundError. A file that is not an .npz (np.load would try to unpickle
    it), or an entry that cannot be read (damaged, missing, or a pickled object array), raises `error`
    with one line naming the file; `hint` ends the not-an-.npz message (how to make a good one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise error(f"{path}: not an .npz archive{hint}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise error(f"{path}: damaged .npz archive ({e})") from None
    with archive:
        yield NpzArchive(path, archive, error)


class NpzArchive:
    """An open .npz whose read errors are one line: `error` naming the file and the entry."""

    def __init__(self, path, archive, error):
        self.path, self.files, self._archive, self._error = path, archive.files, archive, error

    def __getitem__(self, name):
        if name not in self.files:
            raise self._error(f"{self.path}: damaged .npz archive (no entry {name!r})")
        try:
            return self._archive[name]
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise self._error(f"{self.path}: damaged .npz archive (entry {name!r}: {e})") from None


def _format_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000


def download_file(url, path, expected_size=None, timeout=15, hint=""):
    """Download `url` to `path` with a progress line (bytes, rate, ETA), atomically.

    The file appears at `path` only when complete and, if `expected_size` is given (or the server
    sends Content-Length), of exactly that size. Network failures raise ConnectionError with a
    one-line message that ends with `hint` (how to use a local file instead).
    """
    path = Path(path)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"cannot download {url}: {reason}. {hint}".strip()) from None
    with response:
        total = expected_size or int(response.headers.get("Content-Length") or 0) or None
        done, start, last_print = 0, time.monotonic(), 0.0
        with atomic_write(path) as f:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as e:
                    raise ConnectionError(f"download of {url} failed after {_format_bytes(done)}: {e}. "
                                          f"{hint}".strip()) from None
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last_print > 0.5:
                    last_print = now
                    _print_progress(path.name, done, total, now - start)
            if total is not None and done != total:
                raise ConnectionError(f"download of {url} is incomplete: got {done} of {total} bytes. {hint}".strip())
        _print_progress(path.name, done, total, time.monotonic() - start, end="\n")
    return path


def _print_progress(name, done, total, elapsed, end=""):
    rate = done / max(elapsed, 1e-9)
    line = f"\r{name}: {_format_bytes(done)}"
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        line += f" / {_format_bytes(total)} ({100 * done / total:.0f}%), ETA {eta:.0f}s"
    line += f", {_format_bytes(rate)}/s"
    print(line, end=end, file=sys.stderr, flush=True)
