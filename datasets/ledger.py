"""The sample ledger: proof that an epoch trained each of its samples exactly once.

Why count instead of trusting the sampler: a resume at another world size, a restart or a
stop re-derives where the epoch stands, and a mistake there (a batch replayed, a shard
skipped) changes the training without any error. Each rank counts the dataset indices its
batches delivered (undecodable ones skipped with data.on_bad_image = 'skip' included: they
were consumed); at the epoch's end the counts are summed over the ranks and compared with
the epoch's global order up to the samples consumed. A partial epoch's counts travel in the
checkpoint, so the proof holds across stops, restarts and changes of world size.

Cost: one ``index_add_`` of a batch's indices into an int32 vector of N counts per
micro-batch, and one all-reduce of that vector per epoch and per checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from distrib.context import DistContext
from distrib.errors import LaunchError
from distrib.process_group import all_reduce_sum


@dataclass(frozen=True)
class LedgerCheck:
    """One epoch's verdict: how many samples it should have trained and what went wrong."""

    epoch: int  # 0-based
    samples: int  # positions of the epoch's order consumed (the expected trainings)
    left_out: int  # the tail: positions the epoch does not train (N mod G), or not reached yet
    repeated: int  # samples trained more often than the order holds them
    missed: int  # samples trained less often than the order holds them
    example: int  # a dataset index that is wrong (-1: none)

    @property
    def exact(self) -> bool:
        return self.repeated == 0 and self.missed == 0

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self) | {"exact": self.exact}


class Ledger:
    """This rank's counts of the epoch in progress (dataset index -> times delivered)."""

    def __init__(self, n: int):
        self.counts = torch.zeros(n, dtype=torch.int32)
        self._one = torch.ones(0, dtype=torch.int32)

    def add(self, indices: torch.Tensor | list[int]) -> None:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() == 0:
            return
        if self._one.numel() < idx.numel():
            self._one = torch.ones(idx.numel(), dtype=torch.int32)
        self.counts.index_add_(0, idx.cpu(), self._one[: idx.numel()])

    def reset(self, counts: torch.Tensor | None = None) -> None:
        """Start an epoch afresh, or (resume) from the counts a checkpoint carried."""
        self.counts.zero_()
        if counts is not None:
            if counts.numel() != self.counts.numel():
                raise LaunchError(
                    f"the checkpoint's sample ledger counts {counts.numel()} training samples, this "
                    f"run has {self.counts.numel()}: the training set changed since it was written; "
                    "resume with the same data or start fresh"
                )
            self.counts.copy_(counts.to(torch.int32))

    def combined(self, ctx: DistContext) -> torch.Tensor:
        """Every rank's counts summed (all ranks call it at the same point)."""
        total = self.counts.to(ctx.device, copy=True)
        return all_reduce_sum(ctx, total).cpu()


def check(counts: torch.Tensor, order: torch.Tensor, consumed: int, epoch: int) -> LedgerCheck:
    """Compare the summed counts with positions [0, consumed) of the epoch's order."""
    expected = torch.bincount(order[:consumed], minlength=len(order)).to(torch.int32)
    diff = counts.to(torch.int32) - expected
    over, under = diff > 0, diff < 0
    wrong = torch.nonzero(over | under)
    return LedgerCheck(
        epoch=epoch,
        samples=consumed,
        left_out=len(order) - consumed,
        repeated=int(over.sum()),
        missed=int(under.sum()),
        example=int(wrong[0]) if len(wrong) else -1,
    )


def violation(c: LedgerCheck) -> LaunchError:
    """The error a wrong ledger raises: the counts and an index to look at."""
    return LaunchError(
        f"sample ledger of epoch {c.epoch + 1}: {c.repeated} sample(s) trained more often and "
        f"{c.missed} less often than the epoch's order holds them (of {c.samples} consumed; "
        f"dataset index {c.example}, for one); the data order of this run is broken (a resume "
        "replayed or skipped batches). Resume from an earlier checkpoint and report this"
    )
