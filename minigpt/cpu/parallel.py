"""Threads: the one place that decides how many threads work on each matrix product and elementwise pass.

NumPy's elementwise loops (exp, tanh, +=, ...) run on one core, and its BLAS runs matrix products on
threads of its own that spin while they wait for each other. Left alone, the two kinds of threads
fight: on two cores a training step carries the pool's threads plus BLAS's spinning ones, and when
another program is busy, BLAS's threads wait for a partner that is not running (measured: a step
25x slower). So minigpt owns every thread:

- BLAS runs on one thread (set at import through OpenBLAS's own API; no environment variable).
- One pool of `num_threads()` threads, the caller included, runs both kinds of work in slices: rows
  of an elementwise pass, rows (or columns) of a matrix product. Idle workers block; nothing spins.
- Each call decides by its size: small work stays on the calling thread (a hand-off costs ~20 us),
  big work is cut into a few slices more than threads, which the threads claim one at a time, so a
  thread slowed by another program simply takes fewer slices.

Slices are computed independently and each lands in its own part of the output, so results do not
depend on how many threads ran or which took which slice (sums of per-slice partial results aside).
NumPy releases the GIL inside BLAS calls and large ufunc loops, so Python threads run truly parallel.
"""
import ctypes
import functools
import glob
import itertools
import os
import queue
import threading

import numpy as np

MIN_ROWS_PER_SLICE = 8               # below this, a slice's Python overhead outweighs its work
MIN_ELEMENTS_PER_SLICE = 1 << 15     # elementwise: ~30 us of work per slice at least
MIN_MULTIPLY_ADDS_PER_SLICE = 1 << 20  # matrix products: ~10 us of BLAS work per slice at least
SLICES_PER_THREAD = 2                # elementwise: slack, so a thread that falls behind is not waited for
# Products: one slice per thread. A BLAS call is most efficient on big blocks, and halving them cost more
# than the slack saved, quiet and beside a busy neighbour alike (measured on the byte and default models).
MATMUL_SLICES_PER_THREAD = 1


@functools.lru_cache(maxsize=1)
def num_threads():
    """Threads for minigpt's work: MINIGPT_NUM_THREADS, else OMP_NUM_THREADS, else the usable cores.

    Read once, when first asked (call num_threads.cache_clear() after changing the variables).
    """
    for variable in ("MINIGPT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# BLAS on one thread

_SET_THREADS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                "openblas_set_num_threads64_", "openblas_set_num_threads")


def _openblas_candidates():
    """Files that may hold NumPy's OpenBLAS: its wheel's bundled copy, or any OpenBLAS already mapped."""
    numpy_dir = os.path.dirname(np.__file__)
    paths = glob.glob(os.path.join(numpy_dir, os.pardir, "numpy.libs", "*openblas*"))
    paths += glob.glob(os.path.join(numpy_dir, ".dylibs", "*openblas*"))
    try:
        with open("/proc/self/maps") as maps:
            paths += sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]})
    except OSError:  # not Linux
        pass
    return paths


def _blas_to_one_thread():
    """Ask NumPy's OpenBLAS to run every product on the calling thread; True if it took the setting."""
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure BLAS is loaded and initialised
    for path in _openblas_candidates():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _SET_THREADS:
            setter = getattr(library, symbol, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter(1)
                return True
    return False


# Without control over BLAS (NumPy built on MKL or Accelerate), products are left to BLAS's own
# threads and only elementwise work is split: splitting both would put threads on top of threads.
SPLIT_MATMULS = _blas_to_one_thread()


# ---------------------------------------------------------------------------------------------
# The pool

class _Pool:
    """num_threads() - 1 worker threads plus the caller, sharing the slices of one call at a time."""

    def __init__(self, n_threads):
        self.n_threads = n_threads
        self.wakeups = queue.SimpleQueue()
        self.lock = threading.Lock()  # one call at a time (another Python thread's call waits)
        for i in range(n_threads - 1):
            threading.Thread(target=self._work, name=f"minigpt-{i}", daemon=True).start()

    def _work(self):
        _local.in_pool = True
        while True:
            self.wakeups.get()()      # blocks while idle: no spinning

    def run(self, tasks):
        """Call every task (a function of no arguments) once, on the pool's threads; return the results."""
        results, errors = [None] * len(tasks), []
        claim = itertools.count()     # next(claim) is atomic under the GIL: each task runs exactly once
        remaining = [len(tasks)]
        finished = threading.Event()
        counter_lock = threading.Lock()

        def take_tasks():
            for i in iter(claim.__next__, None):
                if i >= len(tasks):
                    return
                try:
                    results[i] = tasks[i]()
                except BaseException as e:  # re-raised by the caller, not lost in a worker
                    errors.append(e)
                with counter_lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        finished.set()

        with self.lock:
            for _ in range(min(self.n_threads, len(tasks)) - 1):
                self.wakeups.put(take_tasks)
            _local.in_pool = True
            try:
                take_tasks()
            finally:
                _local.in_pool = False
            finished.wait()
        if errors:
            raise errors[0]
        return results


_local = threading.local()
_pool = None


def _get_pool():
    global _pool
    if _pool is None or _pool.n_threads != num_threads():
        _pool = _Pool(num_threads())
    return _pool


def _forget_pool():
    global _pool
    _pool = None  # a forked child has none of its parent's threads


os.register_at_fork(after_in_child=_forget_pool)


def parallel_map(fn, items):
    """[fn(item) for item in items], the calls spread over the pool's threads; the results in order."""
    items = list(items)
    if len(items) == 1 or getattr(_local, "in_pool", False) or num_threads() == 1:
        return [fn(item) for item in items]  # inside a slice, never wait on the pool: run here
    return _get_pool().run([lambda item=item: fn(item) for item in items])


def slice_bounds(n, n_slices):
    """n_slices + 1 increasing integers from 0 to n: slices of near-equal length."""
    return [n * i // n_slices for i in range(n_slices + 1)]


def _slices(n, n_slices):
    bounds = slice_bounds(n, n_slices)
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def _count_slices(n, work, min_work_per_slice, min_items=MIN_ROWS_PER_SLICE, per_thread=SLICES_PER_THREAD):
    """How many slices `work` units spread over n items deserve: 1 when small, a few per thread when big."""
    return max(1, min(num_threads() * per_thread, n // min_items, work // min_work_per_slice))


# ---------------------------------------------------------------------------------------------
# Elementwise work

def for_slices(fn, n_rows, row_size=1, max_elements_per_slice=None):
    """Call fn(start, stop) on slices that together cover rows [0, n_rows), in parallel; return the results.

    row_size is the number of elements per row, so small arrays stay on one thread. With
    max_elements_per_slice, big arrays are cut into more slices than that (cache-sized pieces).
    """
    total = n_rows * row_size
    n_slices = _count_slices(n_rows, total, MIN_ELEMENTS_PER_SLICE)
    if max_elements_per_slice:
        n_slices = min(n_rows, max(n_slices, -(-total // max_elements_per_slice)))
    return parallel_map(lambda rows: fn(rows.start, rows.stop), _slices(n_rows, n_slices))


def in_row_slices(fn, *arrays):
    """Call fn on matching row slices of arrays in parallel; return fn's results, one per slice.

    Each array is viewed as 2-d (rows, last axis); arrays written by fn must be C-contiguous so that
    view is the array itself.
    """
    rows = [a.reshape(-1, a.shape[-1]) for a in arrays]
    return for_slices(lambda start, stop: fn(*(r[start:stop] for r in rows)), len(rows[0]), rows[0].shape[1])


# ---------------------------------------------------------------------------------------------
# Matrix products

def matmul(a, b, bias=None):
    """a @ b (+ bias) for a (N, K), b (K, M), bias (M,) -> (N, M), its rows (or, for few rows, its columns)
    split over threads; each slice adds its bias while it is still in cache.

    One row times a row-major b (a token decoded with the KV cache) is split over K instead: the product
    is memory-bound, and each thread streaming one contiguous block of b's rows reads it fastest
    (gpt2-small's 48 block weights: 13.0 ms a token, against 16.7 ms split over columns); the partial
    rows are added, so the result differs from one call's only by float rounding.
    """
    N, K = a.shape
    M = b.shape[1]
    if N == 1 and b.flags.c_contiguous:
        n_slices = _count_matmul_slices(K, K * M)
        if n_slices > 1:
            partials = parallel_map(lambda ks: a[:, ks] @ b[ks], _slices(K, n_slices))  # each (1, M)
            out = partials[0]
            for partial in partials[1:]:
                out += partial
            return out if bias is None else np.add(out, bias, out=out)
    out = np.empty((N, M), dtype=np.result_type(a, b))

    def product(rows, cols):
        np.matmul(a[rows], b[:, cols], out=out[rows, cols])
        if bias is not None:
            out[rows, cols] += bias[cols]
    everything = slice(None)
    if N >= M:
        parallel_map(lambda rows: product(rows, everything), _slices(N, _count_matmul_slices(N, N * K * M)))
    else:
        parallel_map(lambda cols: product(everything, cols), _slices(M, _count_matmul_slices(M, N * K * M)))
    return out


def matmul_tn(a, b):
    """a^T @ b for a (N, K) and b (N, M) -> (K, M), the reduction over N: a weight's gradient x^T @ dout.

    Split over the longest of the three sides. Over K or M, each slice is a block of the output, summed
    over all N rows in one BLAS call. Over N (many rows, a small output: the small models' 128 x 128
    weights), each slice sums its own rows into a partial (K, M) and the partials are added: BLAS runs
    such tall, full-width blocks faster (measured: 4096 x 128 x 128 at 199 GFLOP/s instead of 152).
    """
    N, K = a.shape
    M = b.shape[1]
    work = N * K * M
    if N > max(K, M):
        partials = parallel_map(lambda rows: a[rows].T @ b[rows], _slices(N, _count_matmul_slices(N, work)))
        out = partials[0]                                          # (K, M), this call's own array
        for partial in partials[1:]:
            out += partial
        return out
    out = np.empty((K, M), dtype=np.result_type(a, b))
    if K >= M:
        parallel_map(lambda rows: np.matmul(a[:, rows].T, b, out=out[rows]),
                     _slices(K, _count_matmul_slices(K, work)))
    else:
        parallel_map(lambda cols: np.matmul(a.T, b[:, cols], out=out[:, cols]),
                     _slices(M, _count_matmul_slices(M, work)))
    return out


def _count_matmul_slices(n, work):
    if not SPLIT_MATMULS:
        return 1
    return _count_slices(n, work, MIN_MULTIPLY_ADDS_PER_SLICE, per_thread=MATMUL_SLICES_PER_THREAD)


def sequence_blocks(B, NH, work_per_head):
    """(batch slice, head slice) pairs that cover a (B, NH, ...) array, for work done per sequence and head
    (attention): whole sequences when there are enough to go round, else a few heads of one sequence."""
    n_blocks = _count_slices(B * NH, B * NH * work_per_head, MIN_MULTIPLY_ADDS_PER_SLICE, min_items=1)
    if n_blocks <= B:
        return [(batch, slice(None)) for batch in _slices(B, n_blocks)]
    return [(slice(b, b + 1), heads) for b in range(B) for heads in _slices(NH, -(-n_blocks // B))]
