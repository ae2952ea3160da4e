"""Thread limits for heads fitted in parallel.

With ``jobs`` heads running at once (joblib), each one should use about
``usable_cores() // jobs`` threads, or BLAS, OpenMP and torch each start one thread
per core in every worker and the machine thrashes (on a busy two-core machine, a
two-thread torch head trains 30x slower than a one-thread one). :func:`thread_limit`
caps all of them for the duration of one fit.

BLAS pools and torch's thread count are process-wide (OpenMP's is per calling thread):
worker processes may each pick their own limit; worker threads should all use the
same value, since a context restores the previous counts when it exits.
"""

from __future__ import annotations

import contextlib

import torch
from threadpoolctl import threadpool_limits

from ..runtime import usable_cores


def threads_per_job(jobs: int) -> int:
    """Threads each of ``jobs`` parallel workers may use."""
    return max(1, usable_cores() // max(1, jobs))


@contextlib.contextmanager
def thread_limit(threads: int):
    """Cap BLAS/OpenMP pools (threadpoolctl) and torch intra-op threads at ``threads``, then restore them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)
