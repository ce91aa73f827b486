"""Numba options shared by every kernel module, and thread-count control."""

from __future__ import annotations

import contextlib
import os

import numba

#: Options for serial kernels: cached to disk, releases the GIL.
KERNEL_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")
#: Options for kernels that use ``prange``.
PARALLEL_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", parallel=True)

kernel = numba.njit(**KERNEL_OPTIONS)
#: Small helpers inlined into their callers at the numba IR level.
inline_kernel = numba.njit(inline="always", **KERNEL_OPTIONS)
parallel_kernel = numba.njit(**PARALLEL_OPTIONS)


def resolve_threads(num_threads: int | None) -> int:
    """Map ``num_threads`` (``None``/``-1`` = all) to a valid numba thread count."""
    limit = numba.config.NUMBA_NUM_THREADS
    if num_threads is None or num_threads == -1:
        return limit
    if not isinstance(num_threads, (int,)) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or -1, got {num_threads!r}")
    return min(int(num_threads), limit)


@contextlib.contextmanager
def threads(num_threads: int | None):
    """Run a block with ``num_threads`` numba threads, restoring the previous count."""
    previous = numba.get_num_threads()
    numba.set_num_threads(resolve_threads(num_threads))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def set_num_threads(num_threads: int) -> None:
    """Set the default number of threads used by ipq_index kernels (-1 = all cores)."""
    numba.set_num_threads(resolve_threads(num_threads))


def cpu_count() -> int:
    return os.cpu_count() or 1
