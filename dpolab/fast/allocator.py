"""Keep freed heap memory inside the process while training on a CPU (glibc's malloc only).

By default glibc hands every large block (above a threshold that adapts up to 32 MiB) back to the operating
system when it is freed, and trims the top of the heap when more than twice that is free. A training step frees
and reallocates the same large tensors over and over (activations, a vocabulary-sized gradient, the logits of
the scored tokens), so every step pays the kernel again to map and zero hundreds of megabytes of fresh pages:
on SmolLM2-135M about 200 000 minor page faults and a tenth of the process's CPU time per step
(benchmarks/README.md, "Allocator"). Kept in the heap, the second step's tensors reuse the first step's pages.

:func:`keep_freed_memory` sets glibc's thresholds high for the duration of a ``with`` block and afterwards puts
them at the values the adaptive defaults settle at, then returns the kept memory to the system
(``malloc_trim``). It does nothing where glibc is not the C library, or where the user has chosen malloc
settings through the ``MALLOC_*`` environment variables. What it changes is which pages hold the tensors, never
a number computed: results are bit for bit the same with and without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# during the block: blocks up to 1 GiB come from the heap, the heap is never trimmed, and grows 256 MiB at a time
KEEP = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 1 << 28}
# after it: where glibc's adaptive thresholds end up once large blocks have been freed (mmap threshold at its
# 32 MiB ceiling, trim threshold twice that), and the documented default top pad
AFTER = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_TOP_PAD: 128 << 10}
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def _glibc():
    """The C library as a ctypes handle when it is glibc (Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def user_settings() -> list[str]:
    """The malloc environment variables set in this process (they take precedence over this module)."""
    return [name for name in ENVIRONMENT if name in os.environ]


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, keep freed memory in the heap instead of returning it to the system (see module doc).

    Yields whether the setting is in force: False when ``enabled`` is False, the C library is not glibc, or a
    ``MALLOC_*`` / ``GLIBC_TUNABLES`` environment variable says how the user wants malloc to behave.
    """
    libc = _glibc() if enabled and not user_settings() else None
    if libc is None:
        yield False
        return
    applied = [param for param, value in KEEP.items() if libc.mallopt(param, value) == 1]
    try:
        yield len(applied) == len(KEEP)
    finally:
        for param in applied:
            libc.mallopt(param, AFTER[param])
        if applied:
            libc.malloc_trim(0)
