"""A fork server for the tests: `python launch.py ...` without paying for `import torch` each time.

Why: a launch.py run spends about 3 s of CPU importing torch and torchvision before it does
anything, and the suite starts well over a hundred of them. This process imports them once
(and launch.py's modules, without running any of them: no torch op, no thread pool, no CUDA),
then forks a child per request that runs ``launch.main(args)`` exactly as the script would:
its own session, working directory, environment, argv, stdout and stderr, exit code. What is
not the same as a fresh interpreter: modules are imported before ``launch.main`` applies the
CUDA variables (harmless without a GPU, and the tests of that order start a real interpreter),
and a PYTHONPATH given to a run (the fakes) needs a fresh interpreter, so conftest starts one.

Protocol (a connection per request, served concurrently: the nodes of a multi-node job start
together): a JSON line {args, env, cwd, out, err[, module, fork_ranks, registry]} in; "PID HELPER"
(the run's pid, its rank forker's pid or -1), then its exit code, out, one line each. ``module``
"torch.distributed.run" runs torchrun's own ``main`` instead of launch.py's (``python -m
torch.distributed.run ARGS``); ``registry``: a folder where each forked rank leaves a file named
by its pid holding its LOCAL_RANK (a forked rank's /proc environ is the server's, so the tests
find ranks there rather than by their variables).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def preload() -> None:
    """Everything a launch.py run imports before its first real work."""
    sys.path.insert(0, str(REPO))
    import matplotlib
    import torch
    import torch.distributed.run  # noqa: F401
    import torchvision  # noqa: F401

    import datasets.build  # noqa: F401
    import datasets.commands  # noqa: F401
    import distrib.engine.evaluate  # noqa: F401
    import distrib.engine.train  # noqa: F401
    import distrib.memory.monitor  # noqa: F401
    import distrib.memory.report  # noqa: F401
    import distrib.worker  # noqa: F401
    import launch  # noqa: F401

    _DEFAULT_THREADS.append(torch.get_num_threads())  # before any OMP_NUM_THREADS of a run
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - memory.png and preview.png of every run


def importable_as_forked(pythonpath: str, loaded: set[str]) -> bool:
    """Can a run with this PYTHONPATH be forked rather than started fresh?

    Yes when nothing on it acts at start-up (no sitecustomize/usercustomize) and none of its
    modules is one the fork server imported already (it would shadow nothing): then putting its
    folders on ``sys.path`` is all the variable would have done (the leaky and stuck models). The
    fakes that patch imports at start-up, or shadow a module (pynvml), need a fresh interpreter.
    The repository itself (the test workers' PYTHONPATH) is the server's own first folder.
    """
    for folder in filter(None, pythonpath.split(os.pathsep)):
        path = Path(folder)
        if path.resolve() == REPO:
            continue
        names = {p.name.removesuffix(".py") for p in path.iterdir()} if path.is_dir() else set()
        hooks = names & {"sitecustomize", "usercustomize"}
        if hooks - {"sitecustomize"} or (hooks and not forkable_hook(path)) or (names - hooks) & loaded:
            return False
    return True


def forkable_hook(folder: Path) -> bool:
    """Does ``folder``'s sitecustomize.py say it may run in a forked run (tests/fakes/patching.py)?"""
    return "\nFORKABLE = True" in (folder / "sitecustomize.py").read_text()


def apply_pythonpath() -> None:
    """What the interpreter does with PYTHONPATH at start-up: its folders after the script's, and
    the first of them holding a sitecustomize.py runs it (only forkable ones get this far)."""
    folders = [f for f in os.environ.get("PYTHONPATH", "").split(os.pathsep) if f]
    sys.path[1:1] = [f for f in folders if f not in sys.path]
    hooks = [hook for f in folders if (hook := Path(f) / "sitecustomize.py").is_file()]
    if hooks:
        import runpy

        runpy.run_path(str(hooks[0]), run_name="sitecustomize")


def top_level_modules() -> set[str]:
    return {name.partition(".")[0] for name in sys.modules}


def child(request: dict, forker: socket.socket | None) -> None:
    """Run one launch.py command line in this forked process; never returns."""
    try:
        os.setsid()
        if request.get("unshare_user"):
            unshare_user()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        apply_pythonpath()
        if forker is not None:
            RankForker.install(forker, request.get("registry"))
    except BaseException:  # noqa: BLE001 - reported as the script would report it
        traceback.print_exc()
        os._exit(1)
    if request.get("module") == "torch.distributed.run":
        run_torchrun(request["args"])
    run_launch(request["args"])


def unshare_user() -> None:
    """``unshare -U``: a user namespace of its own (this forked process has one thread, as it must)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER) failed")


def as_main(body: Callable[[], int]) -> None:
    """Run ``body`` as an interpreter runs a program: fds 1 and 2 as line-buffered stdout and stderr,
    its return value (or SystemExit) as the exit code, an uncaught error printed and exit 1; the
    streams flushed, then ``os._exit``. Never returns."""
    code = 1
    try:
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - for the whole process
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        code = body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would report it
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def run_torchrun(args: list[str]) -> None:
    """``python -m torch.distributed.run *args`` (torchrun's own agent and rendezvous); never returns."""

    def body() -> int:
        import torch.distributed.run as torchrun

        sys.argv = [torchrun.__file__, *args]
        torchrun.main(args)
        return 0

    as_main(body)


def run_launch(args: list[str]) -> None:
    """``launch.main(args)`` as ``python -u launch.py *args`` runs it; never returns."""

    def body() -> int:
        sys.argv = [str(REPO / "launch.py"), *args]
        threads_from_env()
        import launch

        code = launch.main(args)
        if launch._RAN_USER_CODE:  # as launch.entry: a user's script gets its atexit handlers
            import atexit

            atexit._run_exitfuncs()
        launch.quick_exit(code)
        return code

    as_main(body)


def threads_from_env() -> None:
    """What ``import torch`` reads from the environment in a fresh interpreter: OMP_NUM_THREADS
    (torchrun sets 1 for every rank) sizes the intra-op pool. Forked, torch was imported before
    that variable was set: without this a rank would use every core, and sum in another order."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else default_threads())


def default_threads() -> int:
    return _DEFAULT_THREADS[0]


_DEFAULT_THREADS: list[int] = []


class RankForker:
    """Ranks that torch's elastic agent (in a forked launcher) starts as ``python -u launch.py ...``
    are forked from a pristine copy of the launcher instead: torch imported, nothing run.

    Why: about 4 s of CPU per rank for ``import torch`` is most of what the suite's multi-rank
    runs cost on two cores. What stays real: torch's agent and its ``SubprocessHandler`` (only
    ``Popen`` is replaced, by :class:`ForkedRank` with the same pid, poll, wait and signals), the
    rank's own session (``start_new_session``), its environment, argv, stdout/stderr and exit
    code, and the process tree below the launcher: the rank is the child of a helper that dies
    with the launcher, so the rank's parent-death signal fires when the launcher goes, as it does
    when the launcher is the rank's parent. The helper is forked before ``launch.main`` runs, so
    no state of the launcher (logging, signal handlers, caches) reaches a rank. A launcher run in
    a fresh interpreter, a PYTHONPATH (the fakes) or ``TEST_FRESH_INTERPRETERS=1`` keeps fresh
    rank interpreters.
    """

    def __init__(self, sock: socket.socket, registry: str | None = None):
        import threading

        self.sock, self.registry = sock, registry
        self.codes: dict[int, int] = {}
        self.ended = threading.Condition()
        self.started: list[int] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="rank-forker").start()

    @classmethod
    def install(cls, sock: socket.socket, registry: str | None = None) -> None:
        """Route the agent's rank starts to the helper at the other end of ``sock``."""
        forker = cls(sock, registry)
        from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

        original = subprocess_handler.SubprocessHandler._popen

        def _popen(handler, args: tuple, env: dict[str, str]):  # noqa: ANN202 - Popen or ForkedRank
            if not forker.can_fork(args, env):
                return original(handler, args, env)
            out = handler._stdout.fileno() if handler._stdout else 1
            err = handler._stderr.fileno() if handler._stderr else 2
            return forker.start(list(args), env, out, err)

        subprocess_handler.SubprocessHandler._popen = _popen

    @staticmethod
    def can_fork(args: tuple, env: dict[str, str]) -> bool:
        return (
            len(args) >= 3
            and args[0] == sys.executable
            and args[1] == "-u"
            and forkable_script(args[2])
            and importable_as_forked(env.get("PYTHONPATH", ""), top_level_modules())
        )

    def start(self, args: list[str], env: dict[str, str], out: int, err: int) -> ForkedRank:
        request = {"args": args[3:], "env": env, "cwd": os.getcwd(), "registry": self.registry,
                   "script": os.path.realpath(args[2])}  # fmt: skip
        encoded = json.dumps(request).encode()
        with self.lock:
            socket.send_fds(self.sock, [encoded], [out, err])
            with self.ended:
                while not self.started:
                    if not self.ended.wait(30):
                        raise OSError("the rank forker did not answer within 30 s")
                pid = self.started.pop(0)
        return ForkedRank(self, pid, args)

    def _read(self) -> None:
        while True:
            msg = self.sock.recv(4096)
            if not msg:
                return
            kind, pid, code = msg.decode().split()
            with self.ended:
                if kind == "pid":
                    self.started.append(int(pid))
                else:
                    self.codes[int(pid)] = int(code)
                self.ended.notify_all()
            if kind == "exit":  # recorded: poll() says it ended, so the zombie may go (one
                self.sock.send(f"reap {pid}".encode())  # message: no lock; start() may hold it)


class ForkedRank:
    """The parts of ``subprocess.Popen`` torch's agent uses, for a rank the helper forked."""

    def __init__(self, forker: RankForker, pid: int, args: list[str]):
        self.forker, self.pid, self.args = forker, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with self.forker.ended:
            self.returncode = self.forker.codes.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        with self.forker.ended:
            while self.pid not in self.forker.codes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0)
                self.forker.ended.wait(left)
            self.returncode = self.forker.codes[self.pid]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def helper_loop(sock: socket.socket) -> None:
    """The rank forker's helper: fork a rank per request, report its pid and exit code; never returns."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: its session (so the fork server) gone, so is this
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # OSError: the launcher is gone
        serve_ranks(sock)
    os._exit(0)


def serve_ranks(sock: socket.socket) -> None:
    """Until the launcher's end of ``sock`` closes: fork the ranks it asks for, report their ends.

    An ended rank stays a zombie until the launcher's side has its exit code ("reap PID"), as a
    ``Popen`` child stays one until ``poll()`` reaps it: torch's agent signals a rank's process
    group (``killpg``) after ``poll()`` said it runs, which must not meet a group already gone.
    """
    import select

    live: set[int] = set()
    while True:
        ready, _, _ = select.select([sock], [], [], 0.02)
        if ready:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
            if not msg:
                return
            if msg.startswith(b"reap "):
                os.waitpid(int(msg.split()[1]), 0)
                continue
            pid = os.fork()
            if pid == 0:
                sock.close()
                rank(json.loads(msg), fds)
            for fd in fds:
                os.close(fd)
            live.add(pid)
            sock.send(f"pid {pid} 0".encode())
        for pid in list(live):
            ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if ended is not None and ended.si_pid == pid:
                live.discard(pid)
                code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status
                sock.send(f"exit {pid} {code}".encode())


def rank(request: dict, fds: list[int]) -> None:
    """One rank, as ``Popen([python, -u, launch.py, ...], start_new_session=True)`` starts it."""
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter sets them
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, target in zip((1, 2), fds, strict=True):
            os.dup2(target, fd)
            os.close(target)
        apply_pythonpath()
        if request.get("registry"):
            Path(request["registry"], str(os.getpid())).write_text(request["env"].get("LOCAL_RANK", ""))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(1)
    if request.get("script", str(REPO / "launch.py")) != str(REPO / "launch.py"):
        run_script(request["script"], request["args"])
    run_launch(request["args"])


def forkable_script(path: str) -> bool:
    """launch.py, or one of the tests' own rank scripts (tests/dist/*_worker.py)."""
    real = Path(os.path.realpath(path))
    worker = real.parent == REPO / "tests" / "dist" and real.name.endswith("_worker.py")
    return real == REPO / "launch.py" or worker


def run_script(path: str, args: list[str]) -> None:
    """``python -u PATH *args`` (a test's rank script) in this forked rank; never returns."""

    def body() -> int:
        import atexit
        import runpy

        sys.argv = [path, *args]
        sys.path.insert(0, os.path.dirname(path))  # as the interpreter puts a script's folder first
        threads_from_env()
        try:
            runpy.run_path(path, run_name="__main__")
        finally:
            atexit._run_exitfuncs()  # on SystemExit too, as at an interpreter's end
        return 0

    as_main(body)


def serve(path: str) -> None:
    preload()
    from distrib.signals import die_with_parent

    die_with_parent(signal.SIGKILL)  # pytest gone: so is this
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    sys.stdout.write("ready\n" + json.dumps(sorted(top_level_modules())) + "\n")
    sys.stdout.flush()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the sessions below: reaped by the kernel
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:  # a session per request: the nodes of one job run side by side
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            die_with_parent(signal.SIGKILL)
            with conn:
                session(conn)
            os._exit(0)
        conn.close()


def session(conn: socket.socket) -> None:
    """One request: fork its rank forker (unless it keeps fresh ranks) and its run, report both pids,
    then the run's exit code once it and the forker have ended."""
    with conn.makefile("rw") as stream:
        line = stream.readline()
        if not line:
            return
        request = json.loads(line)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        helper = os.fork() if request.get("fork_ranks", True) else -1
        if helper == 0:
            conn.close()
            ours.close()
            helper_loop(theirs)
        theirs.close()
        pid = os.fork()
        if pid == 0:
            conn.close()
            child(request, ours if helper > 0 else None)
        ours.close()  # the helper ends when the launcher's end closes: it exited
        stream.write(f"{pid} {helper}\n")
        stream.flush()
        _, status = os.waitpid(pid, 0)
        if helper > 0:
            os.waitpid(helper, 0)
        stream.write(f"{os.waitstatus_to_exitcode(status)}\n")
        stream.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
