"""Files that are never half-written, .npz archives read safely, and resumable-safe downloads.

Everything minigpt writes (weights, checkpoints, run files, downloads) goes through `atomic_write`:
the bytes land in a temporary file beside the target, which is renamed over the target only once it
is complete. A crash or Ctrl-C leaves the old file (or no file), never a truncated one.
Everything it reads from an .npz goes through `open_npz`: nothing is ever unpickled, an entry's
.npy header can be read (and checked) before its data, and a bad file is one line naming it.
"""
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np


class BadFileError(ValueError):
    """A file minigpt cannot use (weights, a checkpoint, adapters, a cache): damaged, of another format, or
    not fitting what it is meant for. The message is one line and names the file."""


# atomic_write's temporary files: ".<target name>.<8 random characters from mkstemp>.tmp"
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# Deflate cannot shrink data more than ~1032:1, so an .npz entry claiming to inflate further lies.
DEFLATE_MAX_RATIO = 1032
# File errors the zipfile module raises for a damaged archive (a flipped flag bit says "encrypted",
# RuntimeError; another says an unknown compression method, NotImplementedError).
ZIP_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, NotImplementedError)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; on a clean exit rename it to `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
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


def remove_temp_files(directory):
    """Delete what atomic_write leaves behind when its process is killed mid-write: the temporary files
    in `directory` and its subfolders -> their paths. Only call it while no one else writes there."""
    leftovers = sorted(path for path in Path(directory).rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}")
                       if TEMP_NAME.fullmatch(path.name) and path.is_file())
    for path in leftovers:
        path.unlink()
    return leftovers


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
    """Write `obj` as indented JSON, atomically. NaN and infinity are refused (ValueError), since JSON has
    no such numbers: where a value may be missing, callers write None (null)."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: cannot write NaN or infinity as JSON ({e})") from None
    with atomic_write(path, "w") as f:
        f.write(text + "\n")


@contextlib.contextmanager
def open_npz(path, error=BadFileError, hint=""):
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
    except ZIP_ERRORS as e:
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
        except ZIP_ERRORS as e:
            raise self._error(f"{self.path}: damaged .npz archive (entry {name!r}: {e})") from None

    def shapes(self, prefix=""):
        """{name: shape} of the entries whose name starts with `prefix` (removed), from header() alone."""
        return {name.removeprefix(prefix): self.header(name)[0]
                for name in self.files if name.startswith(prefix)}

    def header(self, name):
        """(shape, dtype) of entry `name` from its .npy header, without reading its data.

        The entry must hold exactly the bytes its header promises, and no more than deflate could have
        compressed into its stored size: a header edited to claim another shape, or a zip entry
        claiming gigabytes, is refused here, before anything is allocated for it.
        """
        if name not in self.files:
            raise self._error(f"{self.path}: damaged .npz archive (no entry {name!r})")
        zip_file = self._archive.zip
        member = name + ".npy" if name + ".npy" in zip_file.namelist() else name
        try:
            info = zip_file.getinfo(member)
            with zip_file.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                data_start = f.tell()
        except ZIP_ERRORS as e:
            raise self._error(f"{self.path}: damaged .npz archive (entry {name!r}: {e})") from None
        if dtype.hasobject:
            raise self._error(f"{self.path}: damaged .npz archive (entry {name!r} holds Python objects, "
                              f"which are never unpickled)")
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size != data_start + nbytes:
            raise self._error(f"{self.path}: damaged .npz archive (entry {name!r}: its header says {shape} "
                              f"{dtype} ({nbytes} bytes) but it holds {info.file_size - data_start})")
        if (info.compress_size > self.path.stat().st_size
                or info.file_size > DEFLATE_MAX_RATIO * info.compress_size + data_start):
            raise self._error(f"{self.path}: damaged .npz archive (entry {name!r} claims {info.file_size} "
                              f"bytes from {info.compress_size} compressed ones)")
        return shape, dtype


def format_bytes(n):
    """'548.1 MB', '27.3 GB': decimal units, as disks and downloads count them."""
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
                    raise ConnectionError(f"download of {url} failed after {format_bytes(done)}: {e}. "
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
                raise ConnectionError(f"download of {url} is incomplete: got {done} of {total} bytes. "
                                      f"{hint}".strip())
        _print_progress(path.name, done, total, time.monotonic() - start, end="\n")
    return path


def _print_progress(name, done, total, elapsed, end=""):
    rate = done / max(elapsed, 1e-9)
    line = f"\r{name}: {format_bytes(done)}"
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        line += f" / {format_bytes(total)} ({100 * done / total:.0f}%), ETA {eta:.0f}s"
    line += f", {format_bytes(rate)}/s"
    print(line, end=end, file=sys.stderr, flush=True)
