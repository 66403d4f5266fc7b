"""Faults on real processes (CPU, gloo): a killed worker restarts and resumes exactly; a killed
launcher leaves no rank behind."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    LAUNCH,
    REPO,
    TORCHRUN,
    ForkedProc,
    clean_env,
    free_port,
    job_tree,
    launch,
    ranks_of,
    start_launch,
    tiny,
    weights,
)

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
SETS = ("train.epochs=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3")


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "steps.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def start(cmd: list[str], fork_ranks: bool = True, **env: str) -> subprocess.Popen | ForkedProc:
    """``cmd`` in the background (its own session, stderr joined to stdout); a launch.py or torchrun
    command line is forked by the tests' fork server when nothing patches its imports, its ranks too
    unless not ``fork_ranks`` (then fresh interpreters, the launcher's children: the real process tree
    is the subject). :func:`descendants` and ``ranks_of`` find the ranks either way."""
    if cmd[:2] == [sys.executable, LAUNCH]:
        return start_launch(cmd[2:], clean_env(**env), fork_ranks=fork_ranks)
    if cmd[: len(TORCHRUN)] == TORCHRUN:
        return start_launch(cmd[len(TORCHRUN) :], clean_env(**env), fork_ranks=fork_ranks, torchrun=True)
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(**env), start_new_session=True, **out)


def finish(proc: subprocess.Popen, timeout: float = 200) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


TB = importlib.util.find_spec("tensorboard") is not None


def kill_a_rank_at(proc: subprocess.Popen, run_dir: Path, step: int, loader_worker: bool = False) -> None:
    deadline = time.monotonic() + 120
    while steps_logged(run_dir) < step and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    victims = ranks_of(proc, loader_worker)
    while "1" not in victims and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)  # between two loaders (validation, an epoch's end) a rank has no workers
        victims = ranks_of(proc, loader_worker)
    assert "1" in victims, f"no rank 1 (or its DataLoader worker) to kill at step {step}"
    victims["1"].kill()


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [[r[:5] for r in csv.reader((d / "metrics.csv").open())] for d in (a, b)]
    assert rows[0] == rows[1]
    steps = [[(r["step"], r["loss"]) for r in csv.DictReader((d / "steps.csv").open())] for d in (a, b)]
    assert steps[0] == steps[1]  # no duplicate rows after the resume, the same losses


@pytest.fixture(scope="module")
def reference(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    res = launch("train", "--nproc-per-node", "2", *tiny(demo, out, "ref", *SETS), timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "ref"


@pytest.mark.parametrize("victim", ["rank", "loader worker"])
def test_a_killed_worker_restarts_and_resumes_exactly_under_our_launcher(
    demo: Path, reference: Path, tmp_path: Path, victim: str
) -> None:
    """With DataLoader workers: a killed rank's workers hold copies of its sockets and must die
    with it; a killed DataLoader worker (the OOM killer's usual victim) is one line, then a restart."""
    step = random.Random().randint(6, 16)
    board = f"logging.tensorboard={str(TB).lower()}"  # steps trained twice are drawn once (purge)
    proc = start([sys.executable, LAUNCH, "train", "--nproc-per-node", "2", "--max-restarts", "1",
                  *tiny(demo, tmp_path, "k", *SETS, "data.num_workers=2", board)])  # fmt: skip
    kill_a_rank_at(proc, tmp_path / "k", step, loader_worker=victim == "loader worker")
    out = finish(proc)
    assert proc.returncode == 0, f"killed at step {step}\n{out[-3000:]}"
    assert "restart 1: resuming from the newest valid checkpoint" in out and "resumed from" in out
    tb = out.find("Traceback")
    assert tb < 0, out[max(0, tb - 1000) : tb + 6000]  # the survivors say in one line what happened
    if victim == "loader worker":
        assert "[rank 1] ERROR: rank 1: DataLoader worker (pid" in out and "OOM killer" in out, out[-3000:]
    same_run(reference, tmp_path / "k")
    if TB:  # TensorBoard's reader sees each logged step once, with the loss of steps.csv
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "k" / "tensorboard" / "rank0"), size_guidance={"scalars": 0})
        acc.Reload()
        drawn = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        rows = [
            (int(r["step"]), float(r["loss"])) for r in csv.DictReader((tmp_path / "k" / "steps.csv").open())
        ]
        assert [s for s, _ in drawn] == [s for s, _ in rows], (step, drawn)
        assert [v for _, v in drawn] == pytest.approx([v for _, v in rows], rel=1e-6)


def test_a_killed_worker_restarts_and_resumes_exactly_under_torchrun(
    demo: Path, reference: Path, tmp_path: Path
) -> None:
    step = random.Random().randint(6, 16)
    endpoint = f"127.0.0.1:{free_port()}"
    agent = ["--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d"]
    proc = start(
        [*TORCHRUN, *agent, "--rdzv-endpoint", endpoint, LAUNCH, "train", *tiny(demo, tmp_path, "t", *SETS)]
    )
    kill_a_rank_at(proc, tmp_path / "t", step)
    out = finish(proc)
    assert proc.returncode == 0, f"killed at step {step}\n{out[-3000:]}"
    same_run(reference, tmp_path / "t")


def test_a_killed_launcher_leaves_no_rank_training(demo: Path, tmp_path: Path) -> None:
    # fresh ranks, the launcher's children: their parent's death is the subject
    proc = start([sys.executable, LAUNCH, "train", "--nproc-per-node", "2",
                  *tiny(demo, tmp_path, "o", "train.epochs=200")], fork_ranks=False)  # fmt: skip
    deadline = time.monotonic() + 60
    while steps_logged(tmp_path / "o") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = list(ranks_of(proc).values())
    assert len(ranks) == 2
    trained = steps_logged(tmp_path / "o")
    proc.kill()  # SIGKILL: the launcher (the agent) cannot forward anything
    proc.wait()
    gone = psutil.wait_procs(ranks, timeout=15)[1]
    for p in gone:
        p.kill()
    assert gone == [], f"ranks still running after the launcher died: {gone}"
    out = finish(proc, 5)
    saved = sorted((tmp_path / "o" / "checkpoints").glob("ckpt-*.pt"))  # the kernel's SIGTERM: a clean stop
    assert saved and int(saved[-1].stem.split("-")[1]) >= trained, (saved, trained, out[-3000:])


def descendants(proc: subprocess.Popen | ForkedProc) -> list[psutil.Process]:
    """The job's processes below its launcher: ranks (forked or not) and their DataLoader workers."""
    return job_tree(proc)


def stop_and_check(
    proc: subprocess.Popen, sig: int, run_dir: Path, ranks: int, only_rank: str = "", after: int = 4
) -> str:
    """Send ``sig`` once ``after`` steps ran (to the job, or to rank ``only_rank`` alone); the job
    stops, every rank at the same step, checkpointed, one line per rank, nothing left."""
    deadline = time.monotonic() + 120
    while steps_logged(run_dir) < after and time.monotonic() < deadline:
        time.sleep(0.02)
    tree = descendants(proc)
    start = time.monotonic()
    os.kill(ranks_of(proc)[only_rank].pid if only_rank else proc.pid, sig)
    out = finish(proc, 60)
    took = time.monotonic() - start
    left = psutil.wait_procs(tree, timeout=10)[1]
    for p in left:
        p.kill()
    assert left == [], f"processes left after the stop: {left}"
    name = signal.Signals(sig).name
    assert out.count(f"stopped on {name} at epoch") == ranks, out[-3000:]
    where = {line.split(f"stopped on {name} at ")[1].split(";")[0] for line in out.splitlines()
             if f"stopped on {name} at epoch" in line}  # fmt: skip
    assert len(where) == 1, f"the ranks stopped at different steps: {where}"
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert took < 30, took
    return out


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint_and_resume_is_exact(
    demo: Path, reference: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 1 alone (a scheduler signalling one process, a user's kill): the ranks agree on
    the stop, so rank 0 stops at the same step and writes the checkpoint. (SIGTERM to the whole job:
    test_sigterm_to_torchruns_agent_stops_the_ranks_at_a_step.)"""
    args = [sys.executable, LAUNCH, "train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "s", *SETS)]
    proc = start(args)
    out = stop_and_check(proc, signal.SIGTERM, tmp_path / "s", ranks=2, only_rank="1")
    assert proc.returncode == 143, out[-3000:]
    again = launch(*args[2:], "--resume", "auto", timeout=200)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]
    same_run(reference, tmp_path / "s")
    for rank in (0, 1):  # the stop kept its rows; the resume dropped none and timed none twice
        timed = [int(r["step"]) for r in csv.DictReader((tmp_path / "s" / f"timing_rank{rank}.csv").open())]
        assert timed == list(range(1, len(timed) + 1)) and timed[-1] == summary(tmp_path / "s")["global_step"]


def test_sigint_to_a_single_process_stops_at_a_step_and_resumes(demo: Path, tmp_path: Path) -> None:
    args = [sys.executable, LAUNCH, "train", *tiny(demo, tmp_path, "i", *SETS)]
    proc = start(args)
    stop_and_check(proc, signal.SIGINT, tmp_path / "i", ranks=1)
    assert proc.returncode == 130
    assert any((tmp_path / "i" / "checkpoints").glob("ckpt-*.pt"))
    again = launch(*args[2:], "--resume", "auto", timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [r["step"] for r in csv.DictReader((tmp_path / "i" / "steps.csv").open())]
    assert len(steps) == len(set(steps)) and int(steps[-1]) == 40  # 4 epochs x 10 steps of 8, no row twice


def test_sigterm_to_torchruns_agent_stops_the_ranks_at_a_step(demo: Path, tmp_path: Path) -> None:
    # the agent signals each rank's process group: DataLoader workers must not die under the rank
    proc = start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", LAUNCH, "train",
                  *tiny(demo, tmp_path, "a", *SETS, "data.num_workers=2")])  # fmt: skip
    deadline = time.monotonic() + 120
    while steps_logged(tmp_path / "a") < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    tree = descendants(proc)
    os.kill(proc.pid, signal.SIGTERM)
    out = finish(proc, 60)
    assert psutil.wait_procs(tree, timeout=10)[1] == []
    assert out.count("stopped on SIGTERM at epoch") == 2, out[-3000:]  # torchrun's own lines aside
    assert "DataLoader worker" not in out and out.count("Traceback") <= 1, out[-3000:]  # torchrun's own one


def test_a_second_signal_ends_the_process_at_once() -> None:
    code = (
        "import os, signal, time\nfrom distrib.signals import install\nr = install()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\nassert r.requested\nos.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
    )
    start_t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), timeout=20)
    assert res.returncode == 128 + signal.SIGINT and time.monotonic() - start_t < 10


def test_ctrl_c_stops_the_whole_job_dataloader_workers_included(demo: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to the launcher's whole process group."""
    proc = start([sys.executable, LAUNCH, "train", "--nproc-per-node", "2",
                  *tiny(demo, tmp_path, "c", *SETS, "data.num_workers=2")])  # fmt: skip
    deadline = time.monotonic() + 120
    while steps_logged(tmp_path / "c") < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    tree = descendants(proc)
    assert len(tree) >= 2 + 2 * 2, tree  # two ranks, each with two DataLoader workers
    os.killpg(proc.pid, signal.SIGINT)
    out = finish(proc, 60)
    left = psutil.wait_procs(tree, timeout=10)[1]
    for p in left:
        p.kill()
    assert left == [] and proc.returncode == 130, (left, out[-3000:])
    assert out.count("stopped on SIGINT at epoch") == 2 and "Traceback" not in out, out[-3000:]


def test_a_hung_rank_is_named_and_live_stacks_are_dumped(demo: Path, tmp_path: Path) -> None:
    """3 ranks: rank 2 never returns from a forward pass (in Python), rank 1 waits for it in the
    gradient all-reduce and is then frozen (SIGSTOP). Rank 0 gives up after dist.timeout_s and says
    who is where; the stacks of the live ranks (0 and 2) are in the run directory."""
    stuck = str(REPO / "tests" / "fakes" / "stuck")
    sets = tiny(demo, tmp_path, "h", "dist.timeout_s=8", "model.name=stuck_models:StuckCNN")
    proc = start([sys.executable, LAUNCH, "train", "--nproc-per-node", "3", *sets],
                 PYTHONPATH=stuck, STUCK_RANK="2", STUCK_AT="5")  # fmt: skip
    run_dir = tmp_path / "h"
    deadline = time.monotonic() + 120
    while steps_logged(run_dir) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # rank 1 is now inside step 5's all-reduce, waiting for rank 2
    ranks = ranks_of(proc)
    ranks["1"].suspend()
    tree = descendants(proc)
    try:
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:  # until rank 0 gives up; then spare the test the agent's 30 s
            seen.append(line)  # before it SIGKILLs the ranks that cannot act on its SIGTERM
            if "[rank 0] ERROR" in line:
                break
        ranks["0"].wait(30)
        time.sleep(0.5)  # the agent has seen rank 0's exit first
        for r in ("1", "2"):
            ranks[r].kill()
        out = "".join(seen) + finish(proc, 60)
    finally:
        for p in psutil.wait_procs(tree, timeout=5)[1]:
            p.kill()
    error = next(line for line in out.splitlines() if "[rank 0] ERROR" in line)
    assert "waited dist.timeout_s=8s in the backward pass" in error and "at step 5" in error, error
    assert "missing: rank(s) 1 never answered" in error, error
    assert "rank 2 (pid" in error and "is not in it: step 5, in the forward pass" in error, error
    assert str(run_dir / "hang") in error
    launcher = next(line for line in out.splitlines() if line.startswith("[launcher] ERROR"))
    assert "worker rank 0" in launcher and "its error is above" in launcher, launcher  # said once, by rank 0
    assert out.count("missing: rank(s) 1 never answered") == 1, out[-3000:]
    assert "wait_forever" in (run_dir / "hang" / "stack-rank2.txt").read_text()
    assert "train_job" in (run_dir / "hang" / "stack-rank0.txt").read_text()
    assert not (run_dir / "hang" / "stack-rank1.txt").exists()
    assert proc.returncode != 0


def _can_mount_tmpfs() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rmdir $d"
    try:
        return (
            subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=20).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm and tmpfs (a real small disk)")
def test_a_full_disk_mid_checkpoint_is_one_line_and_the_earlier_checkpoints_resume(
    demo: Path, tmp_path: Path
) -> None:
    """checkpoint.dir on a 200 kB tmpfs (a private mount namespace): an 86 kB checkpoint and best.pt fit."""
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    sets = tiny(demo, tmp_path, "d", "train.epochs=4", "checkpoint.keep_last=5")  # one per epoch
    train = [sys.executable, LAUNCH, "train", "--nproc-per-node", "2", *sets]
    script = f'mount -t tmpfs -o size=200k tmpfs "{disk}" && "$@"; rc=$?; cp -a "{disk}" "{saved}"; exit $rc'
    proc = start(["unshare", "-rm", "sh", "-c", script, "sh", *train, "--set", f"checkpoint.dir={disk}"])
    out = finish(proc, 200)
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 2 and errors[0].startswith("[rank 0] ERROR: could not write checkpoint"), errors
    kept = sorted(p.name for p in saved.glob("ckpt-*.pt"))
    assert kept and not list(saved.glob(".*tmp*")), kept  # what fitted; no partial file
    failed = errors[0].split("could not write checkpoint ")[1].split(":")[0]
    assert Path(failed).name not in kept and Path(failed).parent == disk
    for needle in ("No space left on device", "needs about", "free in", f"untouched ({', '.join(kept)})"):
        assert needle in errors[0], errors[0]
    assert errors[1].startswith("[launcher] ERROR") and "its error is above" in errors[1], errors[1]
    assert out.count("No space left on device") == 1, out[-3000:]  # said once, by rank 0
    assert "Traceback" not in out and "unexpected pos" not in out
    again = launch(*train[2:], "--set", f"checkpoint.dir={saved}", "--resume", "auto", timeout=200)
    assert again.returncode == 0 and f"resumed from {saved / kept[-1]}" in again.stderr, again.stderr[-3000:]
