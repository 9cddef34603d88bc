"""One training step's batch split over the CPU's cores, in one process: a thread per share runs its forward and
backward pass, each on one core, and the shares' gradients are summed in a fixed order.

The `cpu` preset's operations (32 px images, 32-channel states, batch 8) are too small for PyTorch's intra-op
threads: on a 2-core EPYC two intra-op threads made a step only 1.06x faster than one, while two Python threads,
each with half the batch and one core, made it 1.5x faster (1.75x with oneDNN held to AVX2). The operations
release the GIL, and the backward pass runs in C++.

Exactness. Each share's gradients go into a buffer of their own (torch.autograd.grad), and the buffers are added in
share order, never in the order the threads finish: floating-point addition is not associative, so with three or
more shares an accumulation into .grad in finishing order would make a run differ from itself. Every random input
is drawn by the data before the split (model.GQN.training_noise), so a step is a deterministic function of its batch:
N threads give the same weights bit for bit in every run and resume, and any other N the same up to rounding.
Under torchrun each rank splits its own slice; the shares' sum is then averaged over the ranks in one all-reduce,
as DDP averages. Not with torch.compile (one graph per step).
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch


def usable_cpus():
    """The CPUs this process may run on (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class BatchThreads:
    """step(loss_of, B, params): a training step's backward pass over n even shares of range(B), a thread each."""

    def __init__(self, n):
        self.n = max(1, n)
        self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="batch-share") if self.n > 1 else None

    def shares(self, B):
        n = min(self.n, B)
        edges = [B * k // n for k in range(n + 1)]
        return [slice(a, b) for a, b in zip(edges, edges[1:])]

    def step(self, loss_of, B, params, average=None):
        """loss_of(share) -> (loss, stats) for each share; its gradients land in each parameter's .grad, summed in
        share order, and `average(grads)` (several processes: the mean over ranks, in place) is applied to the sum.
        With one share the loss's own backward() does it all (a DDP wrapper averages there). -> stats (a tensor, or
        None), summed in share order."""
        shares = self.shares(B)
        if len(shares) == 1:
            loss, stats = loss_of(shares[0])
            loss.backward()
            return stats
        params = [p for p in params if p.requires_grad]

        def share_grads(share):
            loss, stats = loss_of(share)
            return torch.autograd.grad(loss, params, allow_unused=True), stats

        with self._one_core_each():
            futures = [self.pool.submit(share_grads, s) for s in shares]
            results = [f.result() for f in futures]  # share order, whichever finished first
        grads = []
        for i, p in enumerate(params):
            total = None
            for share_grads_, _ in results:
                g = share_grads_[i]
                if g is not None:
                    total = g if total is None else total + g
            grads.append(total)  # None where no share used p: the optimiser skips it, as after one backward()
        if average is not None:  # every rank sends every parameter's gradient
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            average(grads)
        for p, g in zip(params, grads):
            if g is not None:
                if g.stride() != p.stride():  # autograd.grad's layout is the backward's; .grad takes p's, as
                    g = torch.empty_like(p).copy_(g)  # backward() gives it (the fused Adam reads them alike)
                p.grad = g if p.grad is None else p.grad + g
        stats = results[0][1]
        for _, s in results[1:]:
            stats = None if stats is None else stats + s
        return stats

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
