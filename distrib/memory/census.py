"""Which live objects grew: tensors by (shape, dtype, device, grad_fn), numpy arrays by (shape, dtype).

Taken twice some steps apart once a leak is suspected (a walk of the garbage
collector's objects costs tens of milliseconds, so never per step). The group that
grows by about one member per step is nearly always the culprit, and its grad_fn says
whether outputs are being kept with their autograd graph.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

Group = tuple[str, str, str, str, str]  # (kind, shape, dtype, device, grad_fn)


def census() -> Counter[Group]:
    """Live tensors and numpy arrays, counted by group."""
    import torch

    counts: Counter[Group] = Counter()
    seen: set[int] = set()
    try:
        import numpy as np

        ndarray: type | None = np.ndarray
    except ImportError:
        ndarray = None
    # type(), not isinstance(): some objects answer __class__ with a deprecation warning
    for obj in gc.get_objects():
        tp = type(obj)
        if issubclass(tp, torch.Tensor):
            _count(obj, counts, seen)
        elif ndarray is not None and tp in (list, tuple, dict, set):
            # numpy arrays are not tracked by gc; find them in the containers that hold them
            items: Iterable[object] = obj.values() if isinstance(obj, dict) else obj
            for item in items:
                if type(item) is ndarray and id(item) not in seen:
                    seen.add(id(item))
                    counts[("ndarray", str(list(item.shape)), str(item.dtype), "cpu", "")] += 1
    return counts


def _count(t: object, counts: Counter[Group], seen: set[int]) -> None:
    if id(t) in seen:
        return
    seen.add(id(t))
    try:
        grad_fn = type(t.grad_fn).__name__ if t.grad_fn is not None else ""  # type: ignore[attr-defined]
        counts[
            ("tensor", str(list(t.shape)), str(t.dtype).replace("torch.", ""), str(t.device), grad_fn)
        ] += 1  # type: ignore[attr-defined]
    except Exception:  # a tensor subclass or a freed storage: not ours to judge
        return


@dataclass(frozen=True)
class Growth:
    """A group that gained members between two censuses."""

    group: Group
    before: int
    after: int

    @property
    def gained(self) -> int:
        return self.after - self.before

    def describe(self, steps: int) -> str:
        kind, shape, dtype, device, grad_fn = self.group
        what = f"{shape} {dtype}" + (f" on {device}" if device != "cpu" else "")
        per = f" (~{self.gained / steps:.2g} per step)" if steps else ""
        if kind == "ndarray":
            return f"+{self.gained} numpy arrays {what}{per}: arrays kept every step"
        if grad_fn:
            return (
                f"+{self.gained} tensors {what} with grad_fn {grad_fn}{per}: outputs kept with their "
                "autograd graph; store .detach() or .item()"
            )
        return (
            f"+{self.gained} tensors {what}{per}: tensors created every step and kept (appended to a list?)"
        )


def grown(before: Counter[Group], after: Counter[Group], steps: int, top: int = 3) -> list[Growth]:
    """The groups that grew the most, with at least one member per two steps."""
    floor = max(2, steps // 2)
    out = [Growth(g, before.get(g, 0), n) for g, n in after.items() if n - before.get(g, 0) >= floor]
    return sorted(out, key=lambda g: -g.gained)[:top]
