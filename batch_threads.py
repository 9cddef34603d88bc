"""One training step's batch split over the CPU's cores, in one process: a thread per share runs its forward and
backward pass, each on one core.

The `cpu` preset's operations (32 px images, 32-channel states, batch 8) are too small for PyTorch's intra-op
threads: on a 2-core EPYC two intra-op threads made a step only 1.06x faster than one, while two Python threads,
each with half the batch and one core, made it 1.5x faster (1.75x with oneDNN held to AVX2). The operations
release the GIL, and the backward pass runs in C++. Gradients of the shares add up in each parameter's .grad
(autograd locks the accumulation, and a sum of two addends is the same in either order), so a step computes the
gradient of the whole batch's loss. Every random number is drawn before the split (the posterior's eps by the
data, the volume's depth jitter by the caller), so a step is a deterministic function of its batch and a resumed
run still computes exactly what an uninterrupted one does. Not with DDP (one backward per step) or torch.compile.
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch


def usable_cpus():
    """The CPUs this process may run on (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class BatchThreads:
    """map(fn, B): fn(slice) for n even slices of range(B), each in its own thread; n = 1 calls fn(slice(0, B))."""

    def __init__(self, n):
        self.n = max(1, n)
        self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="batch-share") if self.n > 1 else None

    def shares(self, B):
        n = min(self.n, B)
        edges = [B * k // n for k in range(n + 1)]
        return [slice(a, b) for a, b in zip(edges, edges[1:])]

    def map(self, fn, B):
        shares = self.shares(B)
        if self.pool is None or len(shares) == 1:
            return [fn(s) for s in shares]
        with self._one_core_each():
            futures = [self.pool.submit(fn, s) for s in shares]
            return [f.result() for f in futures]

    @contextlib.contextmanager
    def _one_core_each(self):
        # A thread takes PyTorch's thread count when it first runs an operation, so the pool's threads keep 1;
        # the main thread goes back to its count for Adam, the test-set logging and the scores.
        intra = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(intra)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
