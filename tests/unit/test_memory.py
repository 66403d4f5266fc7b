"""The memory detector on recorded series, the census, the monitor in-process, the script host's parsing."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from distrib.config import MemorySection, load_config
from distrib.memory import census as cs
from distrib.memory.detect import Thresholds, classify, mann_kendall_z, steps_to_oom, theil_sen, trend
from distrib.memory.monitor import Monitor, Where, recorder_allowance
from distrib.memory.probe import Probe, nvml_uuid
from distrib.memory.report import verdict_table
from distrib.memory.userscript import Target, run_name, split_target

TH = Thresholds(warmup_steps=20, min_steps=40, rate=2048, total=2 << 20)
MIB = 2**20
STEPS = list(range(1, 301))


def noisy(values: list[float], sd: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [v + rng.gauss(0, sd) for v in values]


def base(level: float = 500 * MIB) -> list[float]:
    return [level] * len(STEPS)


def test_theil_sen_and_mann_kendall_basics() -> None:
    xs = [float(x) for x in range(50)]
    ys = [3.0 * x + 7 for x in xs]
    ys[10] = 1e9  # one wild outlier does not move a robust slope
    assert theil_sen(xs, ys) == pytest.approx(3.0)
    assert mann_kendall_z([float(x) for x in range(60)]) > 5
    assert abs(mann_kendall_z(noisy([0.0] * 60, 1.0))) < 2.33
    assert (
        steps_to_oom(1024, 10 * 1024) == 10 and steps_to_oom(0, 10) is None and steps_to_oom(5, None) is None
    )


def test_linear_growth_is_a_leak_with_its_rate() -> None:
    alloc = noisy([500 * MIB + 30_000 * s for s in STEPS], 200_000)
    v = classify(STEPS, {"alloc": alloc}, TH)
    assert v.leak and v.cause == "tensors" and v.series == "alloc"
    assert v.rate == pytest.approx(30_000, rel=0.05) and v.steps == 281


def test_a_buffer_allocated_once_then_flat_is_not_a_leak() -> None:
    alloc = noisy([500 * MIB + (64 * MIB if s > 150 else 0) for s in STEPS], 100_000)
    t = trend(STEPS, alloc, TH)
    assert t is not None and t.rising_parts == 1  # only one quarter rose
    assert not classify(STEPS, {"alloc": alloc}, TH).leak


def test_noise_is_not_a_leak() -> None:
    for seed in range(5):
        assert not classify(STEPS, {"alloc": noisy(base(), 4 * MIB, seed)}, TH).leak


def test_the_caching_allocators_sawtooth_is_not_a_leak() -> None:
    """Allocated rises within a step and falls back; reserved grows in segments early, then holds."""
    alloc = [500 * MIB + (s % 7) * 8 * MIB for s in STEPS]
    reserved = [600 * MIB + min(s, 30) // 10 * 20 * MIB for s in STEPS]
    assert not classify(STEPS, {"alloc": alloc, "reserved": reserved}, TH).leak


def test_a_leak_that_starts_late_is_found_and_a_short_series_is_not_judged() -> None:
    alloc = [500 * MIB + max(0, s - 100) * 40_000 for s in STEPS]
    assert classify(STEPS, {"alloc": alloc}, TH).leak
    short = list(range(1, 50))
    assert not classify(short, {"alloc": [500 * MIB + 40_000 * s for s in short]}, TH).leak  # 29 < 40


@pytest.mark.parametrize(
    "series, cause",
    [
        ("reserved", "fragmentation"),
        ("gpu_process", "outside_torch_gpu"),
        ("gpu_device", "other_process"),
        ("host", "outside_torch"),
        ("workers_rss", "workers"),
    ],
)
def test_each_growing_series_names_its_cause(series: str, cause: str) -> None:
    flat = {
        name: base() for name in ("alloc", "reserved", "gpu_process", "gpu_device", "host", "workers_rss")
    }
    flat[series] = [500 * MIB + 200_000 * s for s in STEPS]  # fast enough for the reserve's 8x bar too
    v = classify(STEPS, flat, TH)
    assert v.leak and v.cause == cause and v.series == series


def test_reserve_drift_and_the_flight_recorder_fill_are_allowed() -> None:
    slow_heap = [500 * MIB + 4000 * s for s in STEPS]  # glibc's heap creeping on a healthy run
    assert not classify(STEPS, {"alloc": base(), "reserved": slow_heap}, TH).leak
    fill = [500 * MIB + 8000 * min(s, 250) for s in STEPS]  # 2000 collectives recorded: ~2 MiB
    assert classify(STEPS, {"alloc": fill}, TH).leak
    assert not classify(STEPS, {"alloc": fill}, TH, {"alloc": recorder_allowance(2, {})}).leak
    assert recorder_allowance(1, {}) == 0 and recorder_allowance(2, {"TORCH_FR_BUFFER_SIZE": "0"}) == 0


def test_census_names_outputs_kept_with_their_graph() -> None:
    model = torch.nn.Linear(8, 3)
    before = cs.census()
    kept = [model(torch.randn(4, 8)) for _ in range(20)]
    kept += [torch.zeros(5, 5) for _ in range(12)]
    growth = cs.grown(before, cs.census(), steps=20)
    text = [g.describe(20) for g in growth]
    assert any(
        "+20 tensors [4, 3] float32 with grad_fn AddmmBackward0" in t and "autograd graph" in t for t in text
    )
    assert any("+12 tensors [5, 5] float32" in t and "created every step and kept" in t for t in text)
    assert len(kept) == 32


def test_census_counts_numpy_arrays_held_in_lists() -> None:
    import numpy as np

    before = cs.census()
    kept = [np.ones(16) for _ in range(30)]
    growth = cs.grown(before, cs.census(), steps=30)
    assert growth[0].group[0] == "ndarray" and growth[0].gained == 30 and len(kept) == 30


def test_probe_on_the_cpu_says_what_it_cannot_read() -> None:
    p = Probe.open("cpu", None)
    fast = p.fast()
    assert fast.host and fast.heap and fast.rss > 0 and fast.alloc is None
    assert any("runs on the CPU" in lim for lim in p.limits)
    assert p.headroom(fast, p.slow()) > 0
    assert nvml_uuid("8c6f-aa") == "GPU-8c6f-aa" and nvml_uuid("GPU-1") == "GPU-1"


def _monitor(tmp_path: Path, **kw: object) -> Monitor:
    settings = MemorySection(
        interval_s=0.05, warmup_steps=10, check_every=10, min_steps=30, census_gap=10, **kw
    )
    return Monitor(Where(0, 1, "cpu", None, tmp_path), settings, agree=lambda mine: mine).start()


def test_monitor_finds_a_tensor_leak_in_process_and_writes_its_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mon = _monitor(tmp_path)
    model, kept = torch.nn.Linear(64, 128), []
    x = torch.randn(64, 64)
    for step in range(1, 161):
        kept.append(model(x))  # 32 KiB of output plus its graph, every step
        mon.on_step(step)
    f = mon.finish()
    assert f.verdict.leak and f.verdict.cause == "tensors"
    assert any("[64, 128] float32 with grad_fn AddmmBackward0" in g for g in f.groups)
    report = json.loads((tmp_path / "memory_rank0.json").read_text())
    assert report["leak"] and report["steps"] == 160 and report["steps_to_oom"] > 0
    rows = (tmp_path / "memory_rank0.csv").read_text().splitlines()
    assert rows[0].startswith("step,t,alloc") and len(rows) == 161
    assert caplog.text.count("memory is leaking") == 1  # said once, not per check
    assert caplog.text.count("not monitored here") == 1
    assert "YES" in verdict_table([report])


def test_monitor_with_on_leak_fail_raises_on_the_same_check(tmp_path: Path) -> None:
    from distrib.errors import LeakError

    mon = _monitor(tmp_path, on_leak="fail")
    kept = []
    with pytest.raises(LeakError, match="memory.on_leak = fail: memory is leaking on rank 0"):
        for step in range(1, 400):
            kept.append(torch.ones(16384))  # 64 KiB per step
            mon.on_step(step)
    mon.finish()
    assert len(kept) < 120  # stopped early, well before the loop's end


def test_monitor_leaves_a_healthy_loop_alone(tmp_path: Path) -> None:
    mon = _monitor(tmp_path)
    model = torch.nn.Linear(64, 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 201):
        model(torch.randn(64, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        mon.on_step(step)
    assert not mon.finish().verdict.leak


def test_split_target_keeps_the_scripts_arguments_untouched() -> None:
    flags = {"--set", "--config", "--nproc-per-node", "--steps"}
    head, t = split_target(["--nproc-per-node", "2", "s.py", "--lr", "0.1", "--set", "x"], flags)
    assert head == ["--nproc-per-node", "2"] and t == Target("s.py", "", ("--lr", "0.1", "--set", "x"))
    head, t = split_target(["--steps", "5", "--", "s.py", "--steps", "9"], flags)
    assert head == ["--steps", "5"] and t.script == "s.py" and t.args == ("--steps", "9")
    head, t = split_target(["--set", "a=1", "-m", "pkg.mod", "-v"], flags)
    assert head == ["--set", "a=1"] and t == Target("", "pkg.mod", ("-v",))
    assert split_target(["--steps", "5"], flags) == (["--steps", "5"], Target())


def test_run_name_is_the_same_on_every_rank_of_one_launch() -> None:
    cfg = load_config(None)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "x"}
    assert run_name(cfg, env) == run_name(cfg, dict(env)) != run_name(cfg, {**env, "MASTER_PORT": "29512"})
    assert run_name(load_config(None, ["run.name=mine"]), env) == "mine"


def test_nvml_readings_with_hidden_process_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """usedGpuMemory may be None (containers): the device figures still come, the process one stays None."""
    import importlib.util
    import os

    from conftest import FAKE_NVML

    from distrib.memory.probe import Slow, _read_nvml

    spec = importlib.util.spec_from_file_location("fake_pynvml", f"{FAKE_NVML}/pynvml.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    handle = fake.nvmlDeviceGetHandleByUUID("GPU-fake-0001")
    monkeypatch.setenv("FAKE_NVML_PROCS", f"{os.getpid()}:,99999:1048576")
    s = Slow()
    _read_nvml((fake, handle, "GPU-fake-0001"), s)
    assert s.gpu_process is None and s.gpu_device == 2 * 2**20 and s.gpu_total == 80 * 2**30
    monkeypatch.setenv("FAKE_NVML_PROCS", f"{os.getpid()}:4096")
    _read_nvml((fake, handle, "GPU-fake-0001"), s)
    assert s.gpu_process == 4096


def test_snapshot_on_the_cpu_says_why_not_once_and_still_gives_the_verdict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mon = _monitor(tmp_path, on_leak="snapshot")
    kept = []
    for step in range(1, 121):
        kept.append(torch.ones(16384))
        mon.on_step(step)
    f = mon.finish()
    assert f.verdict.leak and caplog.text.count("snapshot needs CUDA") == 1
    assert not list(tmp_path.glob("memory_snapshot_*"))
    assert "uss" in (tmp_path / "memory_rank0.csv").read_text().splitlines()[0]


def test_job_pids_include_this_process_and_its_parent() -> None:
    import os

    from distrib.memory.preflight import job_pids

    pids = job_pids({12345})
    assert {os.getpid(), os.getppid(), 12345} <= pids


def test_without_optimizer_steps_the_background_samples_are_judged(tmp_path: Path) -> None:
    import time

    mon = _monitor(tmp_path)  # samples every 0.05 s
    kept = []
    for _ in range(300):
        kept.append(torch.ones(32768))  # 128 KiB every 10 ms, no optimizer in sight
        time.sleep(0.01)
    f = mon.finish()
    report = json.loads((tmp_path / "memory_rank0.json").read_text())
    assert report["unit"].startswith("sample") and report["steps"] >= 20
    assert f.verdict.leak and "/sample" in report["message"]


# ----------------------------------------------------------------------------- evidence and advice


def test_too_few_points_is_not_judged_not_no() -> None:
    short = list(range(1, 50))  # 30 points after warm-up (steps 20..49), 40 needed
    v = classify(short, {"alloc": [500 * MIB] * len(short)}, TH)
    assert not v.leak and not v.judged
    assert v.text == "not judged: too few samples (30)" and v.short == v.text
    v = classify(STEPS, {"alloc": base(), "workers_rss": [None] * (len(STEPS) - 3) + [1, 2, 3]}, TH)
    assert not v.leak and v.judged and v.short == "no; workers_rss not judged: too few samples (3)"


def test_the_allocator_comes_before_host_memory_when_both_grow() -> None:
    grows = [500 * MIB + 200_000 * s for s in STEPS]
    v = classify(STEPS, {"host": grows, "alloc": grows, "reserved": base()}, TH)
    assert v.leak and v.cause == "tensors" and v.series == "alloc"


def test_advice_fits_the_host_and_worker_verdicts_carry_no_graph_hint() -> None:
    from distrib.memory.detect import Verdict
    from distrib.memory.monitor import NO_GROUP, Finding, census_lines, refine

    frag = Verdict(True, "fragmentation", "reserved", 50_000.0, 10 * MIB, 200)
    cpu, cuda = refine(frag, [], cuda=False), refine(frag, [], cuda=True)
    cpu_line, cuda_line = Finding(cpu).line(0, "cpu"), Finding(cuda).line(0, "cuda:0")
    assert (
        "PYTORCH_CUDA_ALLOC_CONF" not in cpu_line and "glibc's heap" in cpu_line and ".tolist()" in cpu_line
    )
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in cuda_line
    workers = Verdict(True, "workers", "workers_rss", 50_000.0, 10 * MIB, 200)
    assert census_lines(workers, [], 20) == [] and NO_GROUP not in Finding(workers).line(0, "cpu")
    assert census_lines(Verdict(True, "tensors"), [], 20) == [NO_GROUP]


def test_a_short_run_says_not_judged_and_workers_are_read_at_step_boundaries(tmp_path: Path) -> None:
    """Workers that grow by 4 MiB a step: read at each step boundary they are judged (the 1 Hz
    sampler alone saw 3 points); 10 steps are too few to judge anything."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    mon = _monitor(tmp_path / "short")
    for step in range(1, 11):
        mon.on_step(step)
    f = mon.finish()
    assert not f.verdict.leak and not f.verdict.judged
    assert "not judged: too few samples" in verdict_table(
        [json.loads((tmp_path / "short" / "memory_rank0.json").read_text())]
    )
    mon = Monitor(
        Where(0, 1, "cpu", None, tmp_path / "long"),
        MemorySection(interval_s=1.0, warmup_steps=10, check_every=200, min_steps=30, census_gap=10),
        agree=lambda mine: mine,
    ).start()
    grow, done = ctx.Queue(), ctx.Queue()

    def worker() -> None:  # a DataLoader worker's copy-on-read growth, one step at a time
        kept = []
        while grow.get():
            kept.append(bytearray(4 * MIB))
            kept[-1][::4096] = b"x" * len(kept[-1][::4096])  # touch every page
            done.put(1)

    proc = ctx.Process(target=worker)
    proc.start()
    try:
        for step in range(1, 81):
            grow.put(True)
            done.get(timeout=10)
            time.sleep(0.011)
            mon.on_step(step)
    finally:
        grow.put(False)
        proc.join(timeout=10)
    f = mon.finish()
    assert f.verdict.leak and f.verdict.cause == "workers", f.verdict
