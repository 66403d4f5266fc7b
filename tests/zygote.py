"""A fork server for the tests: `python launch.py ...` without paying for `import torch` each time.

Why: a launch.py run spends about 3 s of CPU importing torch and torchvision before it does
anything, and the suite starts well over a hundred of them. This process imports them once
(and launch.py's modules, without running any of them: no torch op, no thread pool, no CUDA),
then forks a child per request that runs ``launch.main(args)`` exactly as the script would:
its own session, working directory, environment, argv, stdout and stderr, exit code. What is
not the same as a fresh interpreter: modules are imported before ``launch.main`` applies the
CUDA variables (harmless without a GPU, and the tests of that order start a real interpreter),
and a PYTHONPATH given to a run (the fakes) needs a fresh interpreter, so conftest starts one.

Protocol (one request at a time, over a Unix socket): a JSON line {args, env, cwd, out, err}
in; the child's pid, then its exit code, out, one line each.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def preload() -> None:
    """Everything a launch.py run imports before its first real work."""
    sys.path.insert(0, str(REPO))
    import matplotlib
    import torch  # noqa: F401
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

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - memory.png and preview.png of every run


def child(request: dict) -> None:
    """Run one launch.py command line in this forked process; never returns."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - for the whole process
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.argv = [str(REPO / "launch.py"), *request["args"]]
        import launch

        code = launch.main(request["args"])
        if launch._RAN_USER_CODE:  # as launch.entry: a user's script gets its atexit handlers
            import atexit

            atexit._run_exitfuncs()
        launch.quick_exit(code)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported as the script would report it
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(path: str) -> None:
    preload()
    from distrib.signals import die_with_parent

    die_with_parent(signal.SIGKILL)  # pytest gone: so is this
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as stream:
            line = stream.readline()
            if not line:
                continue
            request = json.loads(line)
            if request.get("quit"):
                return
            pid = os.fork()
            if pid == 0:
                server.close()
                child(request)
            stream.write(f"{pid}\n")
            stream.flush()
            _, status = os.waitpid(pid, 0)
            stream.write(f"{os.waitstatus_to_exitcode(status)}\n")
            stream.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
