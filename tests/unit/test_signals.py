"""Cancellation signals in real processes: the first one asks for a stop, a second one ends the
process at once, and the parent-death signal of a dying agent is one piece of news however
many of the agent's threads deliver it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env

pytestmark = pytest.mark.timeout(60)


def python(code: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=clean_env(PYTHONPATH=str(REPO)), **kw
    )


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def sends(*sigs: int) -> str:
    """A process that installs the handlers, receives ``sigs`` and reports what it saw."""
    kills = "".join(f"os.kill(os.getpid(), {int(s)}); time.sleep(0.05)\n" for s in sigs)
    return f"""
import os, time
from distrib import signals
stop = signals.install()
{kills}
print(stop.signum, stop.exit_code, stop.name)
"""


def test_the_first_signal_only_asks_for_a_stop() -> None:
    res = python(sends(signal.SIGTERM), stdout=subprocess.PIPE, text=True)
    out, _ = res.communicate(timeout=30)
    assert res.returncode == 0 and out.split()[:3] == [str(int(signal.SIGTERM)), "143", "SIGTERM"]


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_the_process_at_once(second: int) -> None:
    res = python(sends(signal.SIGINT, second), stdout=subprocess.PIPE, text=True)
    out, _ = res.communicate(timeout=30)
    assert out == "" and res.returncode == 128 + second


def test_the_agents_sigterm_after_a_stop_agreed_with_other_ranks_is_not_a_second_signal() -> None:
    """Rank 0 stops on rank 1's signal (agreed, not received); rank 1 exits first and the agent
    SIGTERMs rank 0 while it writes the checkpoint: that is rank 0's first signal, not a second."""
    agreed = ("stop = signals.install()", "stop = signals.install()\nstop.signum = 15")
    res = python(sends(signal.SIGTERM).replace(*agreed), stdout=subprocess.PIPE, text=True)
    out, _ = res.communicate(timeout=30)
    assert res.returncode == 0 and out.split()[:2] == ["15", "143"], (res.returncode, out)
    res = python(sends(signal.SIGTERM, signal.SIGTERM).replace(*agreed), stdout=subprocess.PIPE, text=True)
    out, _ = res.communicate(timeout=30)
    assert out == "" and res.returncode == 143  # its own second signal still ends it


def test_repeated_agent_gone_signals_are_one_request() -> None:
    res = python(sends(signal.SIGHUP, signal.SIGHUP, signal.SIGHUP), stdout=subprocess.PIPE, text=True)
    out, _ = res.communicate(timeout=30)
    assert res.returncode == 0, "a repeat of the parent-death signal was taken for a second signal"
    assert out.startswith(f"{int(signal.SIGHUP)} 129 SIGHUP (the launcher that started this rank is gone)")


def test_the_agent_dying_while_a_rank_stops_lets_it_finish() -> None:
    res = python(sends(signal.SIGTERM, signal.SIGHUP), stdout=subprocess.PIPE, text=True)
    out, _ = res.communicate(timeout=30)
    assert res.returncode == 0 and out.split()[:3] == [str(int(signal.SIGTERM)), "143", "SIGTERM"]


def test_a_sigkilled_threaded_parent_stops_its_child_once(tmp_path: Path) -> None:
    """The real kernel: Linux sends the parent-death signal whenever the child's parent *thread*
    exits and re-parents it to a sibling thread. Here the thread that forked the child ends
    (one signal), then the whole parent is SIGKILLed (another): one stop, no early exit."""
    ready, killed, report = tmp_path / "ready", tmp_path / "killed", tmp_path / "child.txt"
    child = f"""
        import os, time
        from distrib import signals
        stop = signals.install()
        signals.die_with_parent(signals.AGENT_GONE)
        open({str(ready)!r}, 'w').close()
        deadline = time.monotonic() + 20
        while not os.path.exists({str(killed)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the repeat arrives while the "checkpoint" is written
        with open({str(report)!r} + '.tmp', 'w') as f:
            f.write(stop.name)
        os.replace({str(report)!r} + '.tmp', {str(report)!r})  # whole when the test sees it
    """
    parent = f"""
        import os, subprocess, sys, threading, time
        def spawn():
            subprocess.Popen([sys.executable, "-c", {textwrap.dedent(child)!r}])
            while not os.path.exists({str(ready)!r}):
                time.sleep(0.01)
        threading.Thread(target=spawn).start()
        for _ in range(4):
            threading.Thread(target=time.sleep, args=(60,)).start()
        time.sleep(60)
    """
    proc = python(parent, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the child never started"
        time.sleep(0.3)  # the forking thread has ended: the first signal
        proc.kill()
        proc.wait()
        killed.touch()
        deadline = time.monotonic() + 15
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert report.exists(), "the child did not finish its stop (ended by a repeated signal?)"
        assert report.read_text().startswith("SIGHUP")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_rank_whose_launcher_died_exits_even_without_a_step_boundary(tmp_path: Path) -> None:
    """A rank stuck where no step boundary comes (here: a plain sleep) and whose launcher is
    gone must not live on: it exits after the grace time (cut to 1 s here) with one line."""
    pidfile, log = tmp_path / "pid", tmp_path / "rank.log"
    child = f"""
        import logging, os, time
        from distrib import signals
        logging.basicConfig(filename={str(log)!r})
        signals.ORPHAN_GRACE_S = 1.0
        stop = signals.install()
        signals.die_with_parent(signals.AGENT_GONE)
        with open({str(pidfile)!r} + '.tmp', 'w') as f:
            f.write(str(os.getpid()))
        os.replace({str(pidfile)!r} + '.tmp', {str(pidfile)!r})  # whole when the parent sees it
        time.sleep(60)  # stuck: never a step boundary
    """
    parent = f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {textwrap.dedent(child)!r}])
        while not os.path.exists({str(pidfile)!r}):
            time.sleep(0.01)
        time.sleep(0.2)
    """
    proc = python(parent, start_new_session=True)
    assert proc.wait(timeout=30) == 0
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 20
    while (
        Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    ):
        assert time.monotonic() < deadline, "the orphaned rank is still alive"
        time.sleep(0.05)
    assert "no step boundary came within 1 s" in log.read_text()
