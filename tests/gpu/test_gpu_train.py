"""Training on CUDA: AMP, the default job on the GPU, a real out-of-memory message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import launch

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _data(tmp_path: Path) -> list[str]:
    sets = [
        f"data.csv={tmp_path / 'demo' / 'labels.csv'}",
        f"data.images={tmp_path / 'demo' / 'images'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.stats_cache={tmp_path / 'stats'}",
        f"run.out_dir={tmp_path / 'runs'}",
    ]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_default_job_on_the_gpu(amp: str, tmp_path: Path) -> None:
    res = launch(
        "train", *_data(tmp_path), "--set", f"train.amp={amp}", "--set", f"run.name={amp}", timeout=500
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / amp / "summary.json").read_text())
    assert summary["device"] == "cuda:0" and summary["val_acc"] >= 0.95


def test_out_of_memory_names_batch_and_peak(tmp_path: Path) -> None:
    # resnet50 keeps roughly 8 GB of activations per 2048 px image: 32 of them exceed any card
    side, batch = 2048, 32
    res = launch(
        "train",
        *_data(tmp_path),
        "--set",
        "model.name=resnet50",
        "--set",
        f"data.resize=[{side}, {side}]",
        "--set",
        f"data.batch_size={batch}",
        "--set",
        "data.synthetic=200",
        "--set",
        "run.name=oom",
        "--set",
        "data.num_workers=4",
        timeout=500,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "CUDA out of memory" in res.stderr and f"data.batch_size {batch}" in res.stderr
    assert "GiB" in res.stderr
