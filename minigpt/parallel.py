"""Run elementwise NumPy work on every core.

BLAS matrix products already use all cores, but NumPy's elementwise loops (exp, tanh, +=, ...) run on
one. They release the GIL while they loop, though, so Python threads that each take a slice of the
rows run in parallel. Splitting also keeps each slice's temporaries small enough to stay in cache.
Each slice is computed independently, so the result does not depend on how the slices are scheduled.
"""
import functools
import os
from concurrent.futures import ThreadPoolExecutor

MIN_ROWS_PER_SLICE = 8         # below this, thread hand-off costs more than it saves
MIN_ELEMENTS_PER_SLICE = 1 << 15


def num_threads():
    """Threads for elementwise work: MINIGPT_NUM_THREADS, else OMP_NUM_THREADS, else the usable cores."""
    for variable in ("MINIGPT_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(variable, "").isdigit() and int(os.environ[variable]) > 0:
            return int(os.environ[variable])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool():
    return ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="minigpt")


def for_slices(fn, n_rows, row_size=1, max_elements_per_slice=None):
    """Call fn(start, stop) on slices that together cover rows [0, n_rows), in parallel; return the results.

    row_size is the number of elements per row, so small arrays stay on one thread. With
    max_elements_per_slice, big arrays are cut into more slices than threads (cache-sized pieces).
    """
    threads = num_threads()
    total = n_rows * row_size
    n_slices = min(threads, n_rows // MIN_ROWS_PER_SLICE, total // MIN_ELEMENTS_PER_SLICE)
    if max_elements_per_slice:
        n_slices = min(n_rows, max(n_slices, -(-total // max_elements_per_slice)))
    if n_slices <= 1:
        return [fn(0, n_rows)]
    bounds = [n_rows * i // n_slices for i in range(n_slices + 1)]
    if threads == 1:
        return [fn(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    return list(_pool().map(fn, bounds[:-1], bounds[1:]))
