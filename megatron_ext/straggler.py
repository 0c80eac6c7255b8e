"""Straggler report: which rank keeps the others waiting, and on which node.

Each rank times its own part of every step: from the moment the step-boundary agreement
(train._agree, an all-reduce every rank reaches once per step) lets it go to the moment it arrives
at the next one. Time spent waiting there for slower ranks is not counted, so a rank that is slow
outside the step's collectives (a slow host, data loader, CPU contention, a throttled device that
shows up before the synchronising all-reduce) stands out. Once per log interval the ranks gather
their mean busy time (one float each: O(world), nothing per step) and rank 0 reports the slowest
rank, its node and its ratio to the median as ``straggler/ratio`` and ``straggler/rank`` (and
``straggler/node``) in metrics.jsonl and TensorBoard. When the ratio stays above
``health.straggler_ratio`` for ``health.straggler_intervals`` intervals in a row, the step line
also says ``straggler: rank R on NODE is Xx the median`` until it recovers.
"""
from __future__ import annotations

import os
import socket
import statistics
import time


class StragglerReport:
    def __init__(self, recipe, info):
        import torch.distributed as dist

        self.ratio_limit = recipe.health.straggler_ratio
        self.patience = recipe.health.straggler_intervals
        self.world, self.device = info.world_size, info.device
        self.enabled = self.world > 1 and self.ratio_limit > 0
        self.busy, self.steps, self.over = 0.0, 0, 0
        self._released: float | None = None
        self.nodes: list[str] = []
        if self.enabled:  # once per run: which node each rank is on
            self.nodes = [""] * self.world
            dist.all_gather_object(self.nodes, os.environ.get("SLURMD_NODENAME", socket.gethostname()))

    def timed(self, agree, *args):
        """Run the step-boundary agreement, counting the time since the last one as this rank's."""
        if self._released is not None:
            self.busy += time.perf_counter() - self._released
            self.steps += 1
        try:
            return agree(*args)
        finally:
            self._released = time.perf_counter()

    def report(self) -> dict:
        """Collective (every rank, at each log interval): the slowest rank of the interval."""
        if not self.enabled or not self.steps:
            return {}
        import torch
        import torch.distributed as dist

        mine = torch.tensor([self.busy / self.steps], dtype=torch.float64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        self.busy, self.steps = 0.0, 0
        times = [t.item() for t in every]
        median = statistics.median(times)
        rank = max(range(self.world), key=times.__getitem__)
        ratio = times[rank] / median if median > 0 else 1.0
        self.over = self.over + 1 if ratio > self.ratio_limit else 0
        out = {"straggler/ratio": round(ratio, 3), "straggler/rank": rank, "straggler/node": self.nodes[rank]}
        if self.over >= self.patience:
            out["straggler"] = (f"rank {rank} on {self.nodes[rank]} is {ratio:.2f}x the median step time "
                                f"for {self.over} intervals (health.straggler_ratio={self.ratio_limit:g})")
        return out
