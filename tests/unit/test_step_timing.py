"""The straggler judge on numbers (pure) and the step clock on a real model."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from distrib.timing.clock import PHASES, SCHEDSTAT, StepClock, run_queue_wait
from distrib.timing.straggler import Judge, WindowStats


def stats(rank: int, compute: float = 0.02, data: float = 0.002, queue: float = 0.02, comm: float = 0.001):
    wall = compute + data + comm + 0.002
    medians = {"wall": wall, "data": data, "compute": compute, "comm": comm, "optimizer": 0.001,
               "rest": 0.001, "cpu": 1 - queue, "queue": queue}  # fmt: skip
    return WindowStats(rank, "n", "cpu", 5, medians)


def judge(patience: int = 3) -> Judge:
    return Judge(ratio=1.3, min_share=0.05, patience=patience)


def test_a_slow_rank_is_named_once_at_the_patience_th_window_and_again_after_a_break() -> None:
    j = judge()
    slow = [stats(0, comm=0.02), stats(1, compute=0.04, queue=0.5), stats(2, comm=0.02)]
    named = [len(j.window(slow, step)) for step in (5, 10, 15, 20, 25)]
    assert named == [0, 0, 1, 0, 0] and j.episodes[0].rank == 1 and j.episodes[0].last_step == 25
    e = j.episodes[0]
    assert e.phase == "compute" and e.ratio == pytest.approx(2.0) and "its cores are shared" in e.cause
    assert "the others wait" in e.message and "forward/backward 2.00x" in e.message
    j.window([stats(0), stats(1), stats(2)], 30)  # the episode ends
    assert [len(j.window(slow, s)) for s in (35, 40, 45)] == [0, 0, 1] and len(j.episodes) == 2


def test_equal_ranks_tiny_phases_and_a_single_rank_are_never_named() -> None:
    j = judge(patience=1)
    assert not j.window([stats(0), stats(1, compute=0.024)], 5)  # 1.2x: under the ratio
    # data 0.2 ms against 0.6 ms: 3x, but 0.4 ms of a 25 ms step is noise (min_share)
    assert not j.window([stats(0, data=0.0002), stats(1, data=0.0006)], 10)
    assert not j.window([stats(0, compute=1.0)], 15)
    assert j.episodes == []


def test_the_cause_is_read_from_the_ranks_own_numbers() -> None:
    j = judge(patience=1)
    (starved,) = j.window([stats(0), stats(1, data=0.03)], 5)
    assert starved.phase == "data" and "its loader is starved" in starved.cause
    j = judge(patience=1)  # 20x slower data that waited for a CPU too: the wait explains 3x of it
    (starved,) = j.window([stats(0, data=0.002, queue=0.05), stats(1, data=0.04, queue=0.7)], 5)
    assert "its loader is starved" in starved.cause, starved.cause
    j = judge(patience=1)
    (slower,) = j.window([stats(0), stats(1, compute=0.05, queue=0.03)], 5)
    assert "it computes slower" in slower.cause and "shared" not in slower.cause


def test_the_clock_splits_every_step_into_phases_that_add_up_to_its_wall_time() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clock = StepClock(model, comm_hooks=False, cuda=False)
    for step in range(1, 4):
        clock.add("data", 0.003)
        time.sleep(0.003)
        began = clock.begin_forward()
        model(torch.randn(32, 64)).sum().backward()
        clock.end_backward(began, sync=True)
        with clock.optimizer():
            opt.step()
        time.sleep(0.002)  # the step's hooks
        clock.end_step(step)
    assert [r["step"] for r in clock.rows] == [1, 2, 3]
    for row in clock.rows:
        assert sum(row[p] for p in PHASES) == pytest.approx(row["wall"], rel=1e-6)
        assert row["rest"] >= 0.002 and row["data"] == 0.003 and row["compute"] > 0 and row["comm"] == 0
        assert row["cpu"] > 0


def test_after_the_first_backward_only_the_last_accumulated_gradient_keeps_its_hook() -> None:
    """One Python hook per parameter per backward cost ~1% of a CPU step: the clock keeps the one on
    the parameter accumulated last (the first layer's, in a feed-forward net) and still times comm."""
    first, last = nn.Linear(64, 64), nn.Linear(64, 4)
    model = nn.Sequential(first, nn.ReLU(), last)
    clock = StepClock(model, comm_hooks=True, cuda=False)
    assert len(clock._grad_hooks) == 4
    for step in (1, 2):
        began = clock.begin_forward()
        model(torch.randn(32, 64)).sum().backward()
        assert clock.last_grad > began
        clock.end_backward(began, sync=True)
        clock.end_step(step)
        (kept,) = clock._grad_hooks
        assert kept in (id(first.weight), id(first.bias))
    assert all(r["comm"] > 0 for r in clock.rows)  # from the last gradient to the end of backward
    clock.close()
    assert not clock._grad_hooks


def test_a_data_straggler_whose_compute_is_not_slower_is_starved_whatever_its_queue() -> None:
    """Seen in CI: a rank sleeping 4 ms per item in its loader, 0.3 ms of compute preempted once on a
    loaded host ("waited 70% of its compute for a CPU"): its loader starves it, its cores are not
    the news. With compute slowed as well, the shared cores are."""
    j = judge(patience=1)
    (e,) = j.window(
        [stats(0, compute=0.0003, data=0.0004), stats(1, compute=0.0003, data=0.004, queue=0.8)], 5
    )
    assert e.phase == "data" and "its loader is starved" in e.cause, e.cause
    j = judge(patience=1)  # compute 2x slower, data 3x: shared cores slow both alike
    (e,) = j.window([stats(0, data=0.01), stats(1, compute=0.04, data=0.03, queue=0.8)], 5)
    assert e.phase == "data" and e.cause.startswith("it waited 80% of its compute time for a CPU"), e.cause
    j = judge(patience=1)  # CI again: data 8x slower, compute only 1.25x, a 105% "wait" for a CPU
    (e,) = j.window(
        [stats(0, compute=0.002, data=0.002, queue=0.5), stats(1, compute=0.0025, data=0.016, queue=1.05)], 5
    )
    assert e.cause.startswith("its loader is starved"), e.cause
    assert "; also, it waited 105% of its compute time for a CPU" in e.cause  # the second cause


def test_run_files_cut_short_are_read_as_far_as_they_go_and_too_few_windows_are_not_judged(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """run's comparison after the script: rank files written as the script's ranks write them; one
    cut in the middle of a row (a rank killed while writing), one place file overwritten."""
    import json

    from distrib.config import TimingSection
    from distrib.timing.script import judge_files, write_rows

    def rows(n: int, data: float) -> list[dict[str, float]]:
        return [{"step": k, "wall": 0.03, "data": data, "compute": 0.02, "comm": 0.002, "optimizer": 0.001,
                 "rest": 0.001, "cpu": 1.0, "queue": 0.0} for k in range(1, n + 1)]  # fmt: skip

    for rank, data in ((0, 0.001), (1, 0.02)):
        write_rows(tmp_path / f"timing_rank{rank}.csv", rows(40, data))
        (tmp_path / f"timing_rank{rank}.json").write_text(
            json.dumps({"rank": rank, "node": "n", "device": "cpu"})
        )
    settings = TimingSection(window=10, patience=3)
    assert (
        judge_files(tmp_path, 2, settings)["straggler_check"]
        == "4 window(s) of 10 steps compared; 1 episode(s)"
    )
    path = tmp_path / "timing_rank1.csv"
    path.write_bytes(path.read_bytes()[: -len(path.read_text().splitlines()[-1]) // 2 - 1])  # mid-row
    cut = judge_files(tmp_path, 2, settings)
    assert cut["median_s_per_rank"][1]["steps"] == 39 and "1 row(s) cut short or damaged" in caplog.text
    assert cut["straggler_check"] == "3 window(s) of 10 steps compared; 1 episode(s)"
    write_rows(path, rows(25, 0.02))  # two windows only: patience 3 cannot be met
    check = judge_files(tmp_path, 2, settings)["straggler_check"]
    assert check == "not judged: 2 window(s) of 10 steps compared, fewer than timing.patience (3)"
    (tmp_path / "timing_rank0.json").write_text("{")
    alone = judge_files(tmp_path, 2, settings)
    assert alone["straggler_check"] == "not judged: one rank" and "rank 0 is left out" in caplog.text


@pytest.mark.skipif(not SCHEDSTAT.exists(), reason="Linux's /proc/thread-self/schedstat")
def test_the_run_queue_wait_is_this_threads_own_read_fresh_each_time() -> None:
    """The schedstat file stays open (pread at 0): each read must still be regenerated, and a thread
    (or a forked child) must get its own figures, not those of the thread that opened it first."""
    import subprocess
    import sys
    import threading

    def fresh() -> float:
        return int(SCHEDSTAT.read_text().split()[1]) / 1e9

    before = run_queue_wait()
    code = "import time\nend = time.time() + 0.4\nwhile time.time() < end: pass"
    busy = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]  # 3 busy processes
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # runnable beside them: this thread waits for a CPU
        sum(range(1000))
    for p in busy:
        p.wait(10)
    low, kept, high = fresh(), run_queue_wait(), fresh()
    assert before <= low <= kept <= high and high > before  # regenerated, not the first read again
    seen: list[tuple[float, float]] = []
    other = threading.Thread(target=lambda: seen.append((fresh(), run_queue_wait())))
    other.start()
    other.join()
    ((theirs, read),) = seen
    assert theirs <= read < kept  # the new thread's own figure
