"""Keep freed heap memory in the process, so that each batch reuses the last one's pages.

By default glibc gives every allocation above its dynamic mmap threshold (at most 32 MiB) its
own mapping and unmaps it on free, and trims the heap top beyond 128 KiB. A ResNet's batch of
32 allocates activations of 25–100 MiB: every batch page-faulted and zeroed them afresh, which
cost a third of the CPU time of ResNet-18 at batch 32 (BENCHMARKS.md). Threads other than the
main one allocate from arenas whose heaps hold at most 64 MiB, so the compute threads must
share the main arena for the thresholds to reach them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def keep_freed_memory(limit_mib: int) -> bool:
    """Serve allocations up to ``limit_mib`` MiB from one heap that keeps up to as much freed memory.

    Call before the compute threads start (a thread keeps the arena it first allocated from).
    The process's resident memory then stays near its peak instead of falling back between
    batches. Returns whether it applied: glibc only, and ``limit_mib`` 0 leaves glibc's defaults.
    """
    if limit_mib <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    limit = limit_mib << 20
    applied = all(libc.mallopt(option, value) == 1 for option, value in
                  ((M_MMAP_THRESHOLD, limit), (M_TRIM_THRESHOLD, limit), (M_ARENA_MAX, 1)))
    if not applied:
        log.warning("glibc refused to keep %d MiB of freed memory; large activations will page-fault", limit_mib)
    return applied
