"""memory.on_leak = snapshot (CUDA): record allocation history once a leak is suspected, dump a
file that https://pytorch.org/memory_viz opens, and name the frames holding the most live blocks.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MAX_ENTRIES = 100_000
_TORCH_INTERNAL = ("torch/", "<frozen")  # frames inside torch itself, by path prefix


def start_recording(device: str) -> bool:
    """Start torch's allocation history on CUDA; on the CPU say why not (once) and return False."""
    if not device.startswith("cuda"):
        log.warning(
            "memory.on_leak = snapshot needs CUDA (this rank runs on %s): the verdict is logged instead",
            device,
        )
        return False
    import torch

    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES)
    return True


def dump_and_explain(path: Path, top: int = 3) -> list[str]:
    """Dump the snapshot, stop recording, and list the user frames with the most live blocks."""
    import torch

    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)
    lines = [f"allocation history in {path} (open it at https://pytorch.org/memory_viz)"]
    return lines + [
        f"{n} live block(s), {size / 2**20:.1f} MiB, allocated at {frame}"
        for frame, n, size in top_frames(snap, top)
    ]


def _is_user(filename: str) -> bool:
    name = filename.replace("\\", "/")
    return not name.startswith(_TORCH_INTERNAL) and "/torch/" not in name and "distrib/memory/" not in name


def top_frames(snap: dict[str, Any], top: int) -> list[tuple[str, int, int]]:
    """(first frame outside torch, live blocks, bytes) of the blocks allocated while recording."""
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for seg in snap.get("segments", []):
        for block in seg.get("blocks", []):
            frames = block.get("frames") or []
            if block.get("state") != "active_allocated" or not frames:
                continue
            user = next((f for f in frames if _is_user(f.get("filename", ""))), frames[0])
            key = f"{user.get('filename')}:{user.get('line')} ({user.get('name')})"
            count[key] += 1
            size[key] += int(block.get("size", 0))
    return [(k, n, size[k]) for k, n in count.most_common(top)]
