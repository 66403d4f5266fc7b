"""Self-launch: ``python launch.py ... --nproc-per-node N`` runs torch's own elastic agent.

Why torch's agent and not a process pool: it is what torchrun runs, so workers get the
exact same environment contract (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_*), the same failure handling (the first failed
rank's error file is propagated) and the same multi-node rendezvous. We build a
torchrun argument list (pure, unit-tested) and hand it to ``torch.distributed.run``,
which also avoids ``LaunchConfig``'s defaults that differ from torchrun's CLI
(etcd rendezvous, 3 restarts).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distrib.errors import LEAK_EXIT, LaunchError, first_line, user_error_names

log = logging.getLogger(__name__)
# A multi-node job: once MIN nodes are in, a round waits 2 s (not 30) for more (--nnodes MIN:MAX);
# a node whose agent stopped answering is dropped after 4 missed 1 s heartbeats (not 3 of 5 s):
# until then the survivors cannot form the next round.
ELASTIC_RDZV = {"last_call_timeout": 2, "keep_alive_interval": 1, "keep_alive_max_attempt": 4}

# launcher-only flags (both spellings) and whether they take a value; they are not
# passed on to the workers.
LAUNCHER_FLAGS = (
    "nproc-per-node",
    "nnodes",
    "node-rank",
    "master-addr",
    "master-port",
    "rdzv-endpoint",
    "rdzv-id",
    "max-restarts",
)


@dataclass(frozen=True)
class SpawnPlan:
    """Launcher options in torchrun's terms."""

    nproc_per_node: int
    nnodes: str = "1"
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "none"
    max_restarts: int = 0
    run_dir: str = ""  # the workers' run directory: its memory reports tell a leak's exit 3 from a script's
    rejoin_s: float = 0.0  # after the first round, a round must form within this (0: torch's 600 s)


def strip_launcher_flags(argv: Sequence[str]) -> list[str]:
    """Drop launcher flags (``--flag v``, ``--flag=v``, ``-``/``_`` spellings) from argv."""
    names = {f"--{n}" for n in LAUNCHER_FLAGS} | {f"--{n.replace('-', '_')}" for n in LAUNCHER_FLAGS}
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        head = item.split("=", 1)[0]
        if head in names:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def max_nodes(nnodes: str) -> int:
    """torchrun's --nnodes is N or MIN:MAX."""
    return int(nnodes.split(":")[-1])


def torchrun_argv(plan: SpawnPlan, script: str, script_args: Sequence[str]) -> list[str]:
    """The torchrun command line (without 'torchrun') that realises ``plan``."""
    argv = [
        "--nnodes",
        plan.nnodes,
        "--nproc-per-node",
        str(plan.nproc_per_node),
        "--max-restarts",
        str(plan.max_restarts),
    ]
    if plan.rdzv_endpoint:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", plan.rdzv_endpoint]
        argv += ["--rdzv-id", plan.rdzv_id]
        if max_nodes(plan.nnodes) > 1:  # see ELASTIC_RDZV
            argv += ["--rdzv-conf", ",".join(f"{k}={v}" for k, v in ELASTIC_RDZV.items())]
    elif plan.master_port is not None:
        argv += ["--rdzv-backend", "static", "--node-rank", str(plan.node_rank)]
        argv += ["--master-addr", plan.master_addr or "127.0.0.1"]
        argv += ["--master-port", str(plan.master_port)]
    elif max_nodes(plan.nnodes) == 1:
        # what --standalone does, but on a port we choose: with --standalone's localhost:0 a
        # restarted round reads the dead round's addresses and cannot form its group
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
        argv += ["--rdzv-id", plan.rdzv_id if plan.rdzv_id != "none" else uuid.uuid4().hex]
    else:
        raise LaunchError(
            f"--nnodes {plan.nnodes} needs a meeting point: --rdzv-endpoint HOST:PORT (c10d, "
            "same on every node) or --master-addr HOST --master-port PORT with --node-rank."
        )
    return [*argv, script, *script_args]


def free_port() -> int:
    """A loopback port the OS considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port_free(port: int) -> None:
    """Fail before spawning when a fixed store port is taken (the agent would die later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise LaunchError(
                f"--master-port {port} is already in use on this host ({e.strerror}). "
                "Pick a free port, or drop --master-port to let the OS choose one."
            ) from None


def check_plan(plan: SpawnPlan) -> None:
    """Checks that can fail before any worker starts."""
    if plan.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node {plan.nproc_per_node}: start at least 1 process")
    if plan.master_port is not None and plan.node_rank == 0 and not plan.rdzv_endpoint:
        check_port_free(plan.master_port)
    for flag, host in (("--master-addr", plan.master_addr),
                       ("--rdzv-endpoint", (plan.rdzv_endpoint or "").rpartition(":")[0])):  # fmt: skip
        if host:
            check_host(flag, host)


def check_host(flag: str, host: str) -> None:
    """A meeting point whose name does not resolve would leave every node waiting until its
    timeout: say so now."""
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except (OSError, UnicodeError) as e:
        raise LaunchError(
            f"{flag} {host}: this host name or address cannot be resolved here ({e}); give node 0's "
            "address as the other nodes reach it"
        ) from None


def exit_reason(exitcode: object, run_dir: str) -> str:
    """What a worker's exit status without a recorded error means: exit 3 is a leak only when the
    detector says so; a user's script may exit 3 for its own reasons."""
    if exitcode != LEAK_EXIT:
        return ""
    from distrib.memory.report import leak_found  # json only: no torch in the launcher

    leak = leak_found(Path(run_dir)) if run_dir else None
    if leak:
        return "the memory detector found a leak (its verdict is above)"
    if leak is False:
        return f"{LEAK_EXIT} is the script's own exit code: the memory detector found no leak"
    return ""


def recorded_message(failure: object) -> str:
    """The error a failed worker recorded in its error file ('' when none)."""
    message = getattr(failure, "message", "")
    if isinstance(message, dict):
        message = message.get("message", "") or message.get("extraInfo", {}).get("py_callstack", "")
    return str(message)


def recorded_kind(failure: object) -> str:
    """The class name of the error a failed worker recorded ('' when none)."""
    kind, sep, _ = recorded_message(failure).partition(": ")
    return kind if sep else ""


def describe_failure(rank: int, failure: object, run_dir: str = "") -> str:
    """One paragraph naming the failed rank, its exit code and its error."""
    message = recorded_message(failure)
    exitcode = getattr(failure, "exitcode", "?")
    local = getattr(failure, "local_rank", "?")
    pid = getattr(failure, "pid", "?")
    if "elastic/errors.html" in str(message):
        message = ""  # torch's placeholder: the worker exited without raising
    kind, _, rest = str(message).partition(": ")
    if rest and kind in user_error_names():  # one of ours: the rank logged it (errors show from every rank)
        message = "its error is above"
    if not message:
        message = exit_reason(exitcode, run_dir)  # an exit status, not a crash
    return (
        f"worker rank {rank} (local rank {local}, pid {pid}) failed with exit code {exitcode}: "
        f"{message or 'no Python error recorded (it exited with that status, or a signal killed it)'}"
    )


def spawn(plan: SpawnPlan, script: str, script_args: Sequence[str]) -> int:
    """Run the workers through torch's elastic agent; return the process exit status."""
    check_plan(plan)
    argv = torchrun_argv(plan, script, script_args)
    log.info("starting %d worker(s) per node: torchrun %s", plan.nproc_per_node, " ".join(argv))
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousError

    from distrib.membership import install

    member = install(plan.rejoin_s)
    if max_nodes(plan.nnodes) > 1:
        # torch's workers share the round-0 agent's TCP store; a node that joins later then waits
        # forever for bootstrap keys the old rank-0 agent never writes again. A store per round
        # (rank 0's worker hosts it) has neither that hang nor a dead round's keys.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun.run(torchrun.parse_args(argv))
    except RendezvousError as e:
        if not member.rounds:
            raise LaunchError(
                f"the job's rendezvous at {plan.rdzv_endpoint or 'its endpoint'} did not complete "
                f"({first_line(e)}): check that --nnodes {plan.nnodes} node(s) started with the same "
                "--rdzv-endpoint and --rdzv-id, and that the endpoint is reachable"
            ) from None
        if isinstance(e, RendezvousConnectionError):
            raise LaunchError(
                f"the rendezvous store at {plan.rdzv_endpoint} stopped answering ({first_line(e)}): the "
                "node that hosts it (the first agent started with that --rdzv-endpoint) left, and no "
                "round can form without it; start the job again on the nodes there are (the run "
                "continues from its newest checkpoint with --resume auto)"
            ) from None
        raise LaunchError(
            f"a node left the job (it ran on {member.nodes} node(s), world size {member.world}) and no "
            f"new round of --nnodes {plan.nnodes} formed within {plan.rejoin_s:g} s ({first_line(e)}); "
            "start the missing node again with the same --rdzv-endpoint, or lower the minimum of "
            "--nnodes; the run continues from its newest checkpoint (--resume auto)"
        ) from None
    except SignalException as e:  # the agent forwarded it; the ranks stop at a step boundary first
        log.warning("stopped on %s: the workers were asked to stop (train checkpoints first)", e.sigval.name)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if recorded_kind(failure) == "Stopped":  # a signal to a rank, not to us: the ranks said where
            log.warning("the workers stopped on a signal rank %d got (their lines are above)", rank)
        else:
            log.error("%s", describe_failure(rank, failure, plan.run_dir))
        code = getattr(failure, "exitcode", 1)
        return code if isinstance(code, int) and code > 0 else 1
    return 0
