"""Keep freed memory for the next training step instead of handing it back to the operating system.

A training step allocates its activations and gradients afresh (tens of MB for the default model,
GBs for GPT-2) and frees them all at the end. glibc's malloc returns freed memory at the top of its
heap to the kernel, and serves big blocks from mappings of their own that it unmaps when freed, so
the next step gets the memory back page by page. Measured: 11,000 page faults and ~40 ms of kernel
time per 250 ms step on the default model; 136,000 faults and 0.7 s per 4.4 s step on gpt2-small.
Two settings make malloc keep the memory instead: never trim the heap, and serve blocks up to 1 GB
(32 MB where glibc allows no more) from the heap. A step then finds its memory where the last one
left it. The process's peak memory is unchanged; it just no longer shrinks.
Elsewhere than glibc (macOS, Windows, musl) this does nothing.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
NEVER_TRIM = -1         # glibc's documented value for "do not trim"
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # the first that glibc accepts


def keep_freed_memory():
    """Set glibc's thresholds as described above; True when they were taken."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_set = any(mallopt(M_MMAP_THRESHOLD, threshold) for threshold in MMAP_THRESHOLDS)
    return mmap_set and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


KEEPS_FREED_MEMORY = keep_freed_memory()
