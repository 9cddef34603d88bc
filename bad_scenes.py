"""Scenes that cannot be read during a run: named once, counted, and the run stopped when skipping cannot serve.

TrainBatches (sampling.py) fills the place of a scene it cannot read (a bad JPEG, a shard truncated, replaced or
removed after the run started) with other scenes drawn from (seed, step, scene), and says in the batch what it
skipped. BadScenes, in the training process of every rank, takes that report before the step:
  - each unreadable scene is named once in this rank's log;
  - the skipped reads of all ranks are summed (one small all-reduce under torchrun), so every rank counts the same;
    the count goes into every log line, TensorBoard's data/skipped_scenes and the checkpoints;
  - when the count passes --max_bad_scenes, or a place could not be filled at all, every rank stops before the step:
    latest.pt is written at the step reached and the run ends with one line.

What is counted is reads, not scenes: a scene met again in a later epoch is skipped and counted again. --max_bad_scenes
below 1 is a fraction of the scene reads so far, taken over at least one epoch's worth (so 0.01 lets 1% of the scenes
of a data set go bad in its first epoch); 1 or more is a count; 0 stops at the first.
"""
import sys

import torch

from cli import UserError


class DataStop(UserError):
    """Skipping could not serve the step: too many unreadable scenes, or a place no scene could fill."""


class BadScenes:
    """One rank's view of the unreadable scenes of a run: check(step, batch) before each step."""

    def __init__(self, max_bad, num_scenes, batch_size, dist, count=0, device="cpu"):
        self.max_bad, self.num_scenes, self.batch_size, self.dist = max_bad, num_scenes, batch_size, dist
        self.device = device  # NCCL sums CUDA tensors only
        self.count = int(count)  # skipped reads of all ranks since the run began (the checkpoint carries it)
        self.named = set()       # the scenes this rank has named in the log

    def limit(self, step):
        """Most skipped reads allowed by the end of `step` (0-based)."""
        if self.max_bad >= 1 or self.max_bad == 0:
            return self.max_bad
        return self.max_bad * max((step + 1) * self.batch_size, self.num_scenes)

    def check(self, step, batch):
        """Before `step` trains on `batch`: name what it skipped, add every rank's count; DataStop when it cannot
        serve (the same verdict on every rank)."""
        new = {}  # why -> the scenes it names for the first time: a truncated shard's are one line
        for scene, why in batch["bad"]:
            if scene not in self.named:
                self.named.add(scene)
                new.setdefault(why, []).append(scene)
        rank = f"rank {self.dist.rank}: " if self.dist.started else ""
        for why, scenes in new.items():
            print(f"warning: {rank}step {step}: skipped training scene{'s' if len(scenes) > 1 else ''} "
                  f"{', '.join(map(str, sorted(scenes)))}, which cannot be read ({why}); other scenes took their "
                  f"places in the batch", file=sys.stderr, flush=True)
        if not self.dist.started and not batch["bad"] and batch["unserved"] is None:
            return  # nothing to add: one process skips the sum
        stats = self.dist.all_reduce(torch.tensor([len(batch["bad"]), batch["unserved"] is not None],
                                                  dtype=torch.float64, device=self.device)).cpu()
        count = self.count + int(stats[0])  # kept only if the step runs: a resumed run reads its batch again
        if stats[1] > 0:
            why = batch["unserved"] or "another rank's batch has a place no scene could fill"
            raise DataStop(f"step {step}: {why}; the training data cannot serve")
        if count > self.limit(step):
            raise DataStop(f"step {step}: {count} scene reads failed, more than --max_bad_scenes {self.max_bad:g} "
                           f"allows ({self.limit(step):g} by this step)")
        self.count = count
