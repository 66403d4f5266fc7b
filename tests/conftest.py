"""Shared test helpers: a clean environment, real subprocesses, and leak checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from distrib.context import LAUNCHER_VARS

REPO = Path(__file__).resolve().parent.parent
LAUNCH = str(REPO / "launch.py")
FAKE_NVML = str(REPO / "tests" / "fakes" / "nvml")
PROBE = str(REPO / "tests" / "fakes" / "probe")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, from this interpreter
TORCHRUN_MODULE = "torch.distributed.run"
# variables a developer's shell (or CI) might carry that would change what a test means
_STRIP_PREFIXES = ("CUDA_", "SLURM_", "TORCHELASTIC_", "NCCL_", "FAKE_NVML", "TORCH_IMPORT_PROBE")
_STRIP = (*LAUNCHER_VARS, "PYTHONPATH")


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without launcher/CUDA variables, plus ``extra``.

    One intra-op thread per process unless ``extra`` says otherwise: the suite runs two tests at
    a time on two cores, and a single-process run (or a one-rank node: torch's agent sets
    OMP_NUM_THREADS=1 only for more than one rank per node) would otherwise start an OpenMP thread
    per core, which spin beside the other processes (two one-rank nodes here ran 139 steps in 19 s,
    against 200 in 7 s on one 2-rank node)."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIP and not k.startswith(_STRIP_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours is gone for practical purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 90,
    cwd: Path | str = REPO,
    fresh: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own session; kill the whole session on timeout; check none is left.

    A torchrun command line (``TORCHRUN ...``) is forked by the fork server, its launch.py ranks too
    (torchrun's own ``main``: its agent, rendezvous and worker handling), unless ``fresh``, the
    environment's PYTHONPATH needs a fresh interpreter or TEST_FRESH_INTERPRETERS=1."""
    env = env or clean_env()
    server = None if fresh or list(cmd[: len(TORCHRUN)]) != TORCHRUN else forking_zygote(env)
    if server is not None:
        return forked(server, list(cmd[len(TORCHRUN) :]), env, timeout, module=TORCHRUN_MODULE)
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n{out}\n{err}") from None
    try:
        os.killpg(proc.pid, 0)
        leftover = True
    except ProcessLookupError:
        leftover = False
    if leftover:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"processes left running in the session of {cmd}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def command_line(args: Sequence[str], torchrun: bool = False) -> list[str]:
    """``python launch.py *args``, or ``torchrun *args``, as a fresh interpreter would be started."""
    return [*(TORCHRUN if torchrun else [sys.executable, LAUNCH]), *args]


def run_many(jobs: Sequence[tuple[Sequence[str], dict[str, str]]], timeout: float = 150) -> list:
    """Run several commands at once (nodes, SLURM tasks) and wait for all: each as :func:`run` runs
    it (launch.py and torchrun command lines forked by the fork server, which serves them side by
    side), its session killed on timeout and checked empty afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    zygote()  # started from this thread: its parent-death signal fires when the starting thread ends

    def one(cmd: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        server = forking_zygote(env) if list(cmd[:2]) == [sys.executable, LAUNCH] else None
        if server is not None:
            return forked(server, list(cmd[2:]), env, timeout)
        return run(cmd, env=env, timeout=timeout)

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one, cmd, env) for cmd, env in jobs]
        return [f.result() for f in futures]


def launch(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 90,
    fresh: bool = False,
    unprivileged: bool = False,
):
    """``python launch.py *args``: forked from the test fork server (tests/zygote.py: torch is already
    imported there; its ranks are forked too), or a fresh interpreter when ``fresh``, when ``env``'s
    PYTHONPATH needs one (fakes that patch imports at start-up or shadow a loaded module) or when
    TEST_FRESH_INTERPRETERS=1. Same session, files, exit code. ``unprivileged``: in a user namespace
    of its own, as ``unshare -U`` runs it (root there lacks the capability to ignore file modes)."""
    env = env or clean_env()
    server = None if fresh else forking_zygote(env)
    if server is None:
        return run([*(["unshare", "-U"] if unprivileged else []), sys.executable, LAUNCH, *args], env=env,
                   timeout=timeout)  # fmt: skip
    return forked(server, list(args), env, timeout, unprivileged=unprivileged)


class ForkedProc:
    """The parts of subprocess.Popen the tests use, for a launch.py run forked by the fork server:
    stdout and stderr together through a FIFO (as stderr=STDOUT), the exit code from the server."""

    def __init__(
        self,
        server: str,
        args: list[str],
        env: dict[str, str],
        fork_ranks: bool = True,
        module: str = "",
        log: Path | None = None,
    ):
        import tempfile
        import threading

        self.args = command_line(args, bool(module))
        self.returncode: int | None = None
        self._tmp = tempfile.mkdtemp(prefix="forked-")
        self.registry = Path(self._tmp, "ranks")  # the forked ranks: a file per pid (tests/zygote.py)
        self.registry.mkdir()
        out = str(log) if log else os.path.join(self._tmp, "out")
        if not log:
            os.mkfifo(out)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(server)
        self._stream = self._sock.makefile("rw")
        request = {"args": args, "env": env, "cwd": str(REPO), "out": out, "err": out, "module": module,
                   "fork_ranks": fork_ranks, "registry": str(self.registry)}  # fmt: skip
        self._stream.write(json.dumps(request) + "\n")
        self._stream.flush()
        pid, helper = self._stream.readline().split()
        self.pid, self.helper = int(pid), int(helper)
        # stderr joined to stdout, in a FIFO read by ``communicate`` (or in ``log``, as a file)
        self.stdout = open(os.devnull if log else out)  # noqa: SIM115 - open until the last writer closes it
        self._done = threading.Event()
        threading.Thread(target=self._wait_for_code, daemon=True).start()

    def _wait_for_code(self) -> None:
        line = self._stream.readline()
        self.returncode = int(line) if line.strip() else -signal.SIGKILL
        self._sock.close()
        shutil.rmtree(self._tmp, ignore_errors=True)  # the FIFO is open already; no rank is left to find
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        import threading

        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.stdout.read()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(timeout)
        self.stdout.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        return out[0], None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def tree(self) -> list:
        """Every process of the job: the run's descendants, and its rank forker with the forked ranks
        and their children (the forker is the run's sibling: tests/zygote.py)."""
        import psutil

        found = []
        for pid in (self.pid, self.helper):
            with contextlib.suppress(psutil.NoSuchProcess):
                top = psutil.Process(pid)
                found += ([top] if pid == self.helper else []) + top.children(recursive=True)
        return found

    def forked_ranks(self) -> dict[int, str]:
        """pid -> LOCAL_RANK of every rank the forker started (ended ones included)."""
        return registered_ranks(self.registry)


def start_launch(
    args: list[str],
    env: dict[str, str],
    fork_ranks: bool = True,
    torchrun: bool = False,
    log: Path | None = None,
) -> subprocess.Popen | ForkedProc:
    """``python launch.py *args`` (``torchrun *args`` with ``torchrun``) running in the background, its
    own session, stderr joined to stdout: in ``.stdout``, or written to ``log``. Forked by the fork
    server unless ``env``'s PYTHONPATH needs a fresh interpreter; its launch.py ranks too unless not
    ``fork_ranks`` (then fresh interpreters, children of the launcher: tests whose subject is the
    real process tree). :func:`job_tree` and :func:`ranks_of` find the ranks either way."""
    server = forking_zygote(env)
    if server is None:
        cmd = command_line(args, torchrun)
        out = log.open("w") if log else subprocess.PIPE
        try:
            return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)  # fmt: skip
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
    return ForkedProc(server, args, env, fork_ranks, TORCHRUN_MODULE if torchrun else "", log)


def job_tree(proc: subprocess.Popen | ForkedProc) -> list:
    """Every process of a job started by :func:`start_launch` (its ranks however they were started)."""
    import psutil

    if isinstance(proc, ForkedProc):
        return proc.tree()
    return psutil.Process(proc.pid).children(recursive=True)


_ZYGOTE: dict[str, object] = {}


def forking_zygote(env: dict[str, str]) -> str | None:
    """The fork server, unless ``env``'s PYTHONPATH needs a fresh interpreter (a fake that patches
    imports at start-up or shadows a module the server imported: tests/zygote.py)."""
    from zygote import importable_as_forked

    server = zygote()
    loaded: set[str] = _ZYGOTE.get("modules", set())  # type: ignore[assignment]
    if server is None or not importable_as_forked(env.get("PYTHONPATH", ""), loaded):
        return None
    return server


def zygote() -> str | None:
    """The fork server's socket, started on first use (None: fresh interpreters for every run)."""
    if "path" not in _ZYGOTE:
        _ZYGOTE["path"] = None
        if os.environ.get("TEST_FRESH_INTERPRETERS") == "1":
            return None
        import atexit
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="zygote-"), "sock")
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py"), path], cwd=REPO,
                                env=clean_env(), stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            return None
        atexit.register(proc.kill)
        _ZYGOTE.update(path=path, proc=proc, modules=set(json.loads(proc.stdout.readline())))
    return _ZYGOTE["path"]  # type: ignore[return-value]


def forked(
    server: str,
    args: list[str],
    env: dict[str, str],
    timeout: float,
    module: str = "",
    unprivileged: bool = False,
) -> subprocess.CompletedProcess[str]:
    """One launch.py run (or, with ``module``, a torchrun run) forked by the fork server; its
    session is killed on timeout, and no process may be left in it afterwards (as :func:`run` checks)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="launch-") as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        registry = Path(tmp, "ranks")  # the forked ranks: their own sessions, killed on a timeout too
        registry.mkdir()
        request = {"args": args, "env": env, "cwd": str(REPO), "out": out, "err": err, "module": module,
                   "registry": str(registry), "unshare_user": unprivileged}  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server)
            stream = sock.makefile("rw")
            stream.write(json.dumps(request) + "\n")
            stream.flush()
            pid = int(stream.readline().split()[0])
            sock.settimeout(timeout)
            try:
                code = int(stream.readline())
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                kill_ranks(registry)  # a hung rank outlives its launcher (it waits to stop at a step)
                raise AssertionError(f"timed out after {timeout}s: launch.py {args}") from None
        try:
            os.killpg(pid, 0)
            left = True
        except ProcessLookupError:
            left = False
        if left:
            os.killpg(pid, signal.SIGKILL)
            raise AssertionError(f"processes left running in the session of launch.py {args}")
        with open(out) as fo, open(err) as fe:
            cmd = command_line(args, bool(module))
            return subprocess.CompletedProcess(cmd, code, fo.read(), fe.read())


def registered_ranks(registry: Path) -> dict[int, str]:
    """pid -> LOCAL_RANK of the ranks a rank forker registered in ``registry`` (tests/zygote.py)."""
    return {int(f.name): f.read_text() for f in registry.iterdir()} if registry.is_dir() else {}


def kill_ranks(registry: Path) -> None:
    """SIGKILL every rank a forked run's rank forker started, and their children (DataLoader workers)."""
    import psutil

    for pid in registered_ranks(registry):
        with contextlib.suppress(psutil.Error):
            rank = psutil.Process(pid)
            for p in [*rank.children(recursive=True), rank]:
                with contextlib.suppress(psutil.Error):
                    p.kill()


def ranks_of(proc: subprocess.Popen | ForkedProc, loader_workers: bool = False) -> dict:
    """The job's running ranks by LOCAL_RANK (the agent's children, or the ranks the fork server's
    rank forker started), or one DataLoader worker of each."""
    found = {}
    import psutil

    def running(p: psutil.Process) -> bool:  # a worker that ended but is not reaped yet cannot be killed
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            return p.status() != psutil.STATUS_ZOMBIE
        return False

    forked = proc.forked_ranks() if isinstance(proc, ForkedProc) else {}
    for pid, local in forked.items():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rank = psutil.Process(pid)
            workers = [w for w in rank.children() if running(w)] if loader_workers else [rank]
            if workers and running(rank):
                found[local] = workers[0]
    if forked:
        return found
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env, parent = child.environ(), child.parent()
            parent_is_rank = parent is not None and "LOCAL_RANK" in parent.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if (
            "LOCAL_RANK" in env
            and "launch.py" in " ".join(child.cmdline())
            and parent_is_rank == loader_workers
        ):
            found[env["LOCAL_RANK"]] = child
    return found


def rank_reports(out_dir: Path) -> list[dict]:
    """Every rank's report of the single run under ``out_dir``, in rank order."""
    runs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    files = sorted((runs[0] / "ranks").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]


def reference_stats(
    paths: Sequence[str], resize: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy over every decoded pixel: the ground truth."""
    from torchvision.transforms import v2

    from datasets.transforms import decode_uint8

    rs = v2.Resize(list(resize), antialias=True) if resize else None
    chans: list[list[np.ndarray]] = [[], [], []]
    for p in paths:
        img = decode_uint8(p)
        img = rs(img) if rs else img
        for c in range(3):
            chans[c].append(img[c].numpy().astype(np.float64).ravel() / 255.0)
    allc = [np.concatenate(c) for c in chans]
    return np.array([a.mean() for a in allc]), np.array([a.std() for a in allc])


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (4 classes x 30 images of 32 px) shared by every training test."""
    from datasets.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root / "src", classes=4, per_class=30, size=32, seed=1)
    return root


def tiny(demo: Path, out: Path, name: str, *extra: str) -> list[str]:
    """--set arguments for a fast, BN-free, deterministic run on the demo data."""
    sets = [
        f"data.csv={demo / 'src' / 'labels.csv'}",
        f"data.images={demo / 'src' / 'images'}",
        f"data.cache_dir={demo / 'cache'}",
        f"data.stats_cache={demo / 'stats'}",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.width=8",
        "model.batchnorm=false",
        "optim.schedule=constant",
        "optim.lr=0.05",
        "optim.warmup_epochs=0",
        "train.epochs=3",
        "train.log_every=1",
        f"run.out_dir={out}",
        f"run.name={name}",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def weights(run_dir: Path) -> dict:
    """The model tensors of a run's newest checkpoint."""
    import torch

    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["model"]


def flip_inside_largest_tensor(path: Path, n: int = 64) -> None:
    """Flip bytes in the middle of the biggest tensor record: torch's zip reader does not notice."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Tests may set variables (launch.py applies CUDA ones); put os.environ back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
