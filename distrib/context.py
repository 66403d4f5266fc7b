"""The one frozen description of "who am I" in a distributed job.

``DistContext.from_env`` is the only reader of torchrun's and SLURM's variables. It is
a pure function of a mapping and the number of usable CUDA devices, so every launcher
(torchrun, our own elastic-agent spawn, SLURM ``srun``, a bare ``python``) is tested as
data, rank by rank, in one process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from distrib.errors import LaunchError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# every variable a launcher sets for its workers (torchrun adds GROUP_RANK, OMP_NUM_THREADS)
LAUNCHER_VARS = (*TORCHRUN_VARS, "GROUP_RANK", "OMP_NUM_THREADS")
SLURM_PORT_BASE = 15000  # default MASTER_PORT under SLURM: base + job id % 20000


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. Built once, passed explicitly, never mutated."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    backend: str = "gloo"  # nccl | gloo
    device: str = "cpu"  # "cpu" or "cuda:<local_rank>"
    launcher: str = "single"  # torchrun | slurm | single
    restart: int = 0  # the elastic agent's restart round (TORCHELASTIC_RESTART_COUNT); 0 = first start
    rdzv_round: int = 0  # the rendezvous round all nodes agree on (our launcher); else the restart count
    nodes: int = 1  # nodes in the job (GROUP_WORLD_SIZE, SLURM_NNODES): elastic resumes name a change
    run_id: str = ""  # TORCHELASTIC_RUN_ID: the rendezvous whose round keys this job's store holds

    @property
    def is_main(self) -> bool:
        """True on global rank 0: the one rank that writes files and logs by default."""
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        """True when this rank computes on a CUDA device."""
        return self.device.startswith("cuda")

    @property
    def distributed(self) -> bool:
        """True when there is more than one process, i.e. a process group is needed."""
        return self.world_size > 1

    @staticmethod
    def from_env(env: Mapping[str, str], *, backend: str = "auto", cuda_device_count: int = 0) -> DistContext:
        """Build the context from torchrun variables, else SLURM's, else a single process.

        Args:
            env: the process environment (``os.environ``) or any mapping in tests.
            backend: ``auto`` | ``nccl`` | ``gloo`` (``dist.backend`` in the config).
            cuda_device_count: CUDA devices this process can use (``torch.cuda.device_count()``
                when CUDA is available, else 0).
        """
        if started_as_rank(env):
            fields = _from_torchrun(env)
        elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
            fields = _from_slurm(env)
        else:
            fields = {}
        ctx = DistContext(**fields)
        return _with_device(ctx, backend, cuda_device_count)


def started_as_rank(env: Mapping[str, str]) -> bool:
    """True when torchrun (or anything that sets its variables) already made this process a rank.

    The one test of it: launch.py asks it to decide between spawning and being a worker.
    """
    return "RANK" in env or "WORLD_SIZE" in env


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise LaunchError(f"{name} is not set; it is required when RANK/WORLD_SIZE are set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


def _from_torchrun(env: Mapping[str, str]) -> dict[str, object]:
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in env]
    world = _int(env, "WORLD_SIZE", 1)
    if world > 1:
        missing += [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise LaunchError(
            f"partial torchrun environment: {', '.join(missing)} missing while "
            f"{', '.join(v for v in TORCHRUN_VARS if v in env)} are set. Start with torchrun "
            "or `python launch.py --nproc-per-node N`, or unset the stray variables."
        )
    rank, local_rank = _int(env, "RANK"), _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    _check_ranks(rank, world, local_rank, local_world)
    node = _int(env, "GROUP_RANK", rank // max(local_world, 1))
    return dict(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT", 0),
        launcher="torchrun",
        restart=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
        rdzv_round=_int(env, "TORCHLAUNCH_RDZV_ROUND", _int(env, "TORCHELASTIC_RESTART_COUNT", 0)),
        nodes=_int(env, "GROUP_WORLD_SIZE", max(1, world // max(local_world, 1))),
        run_id=env.get("TORCHELASTIC_RUN_ID", ""),
    )


def _from_slurm(env: Mapping[str, str]) -> dict[str, object]:
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    rank = _int(env, "SLURM_PROCID")
    node = _int(env, "SLURM_NODEID", 0)
    local_world = slurm_tasks_on_node(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world), node
    )
    local_rank = _int(env, "SLURM_LOCALID", 0)
    _check_ranks(rank, world, local_rank, local_world)
    nodelist = (
        env.get("SLURM_STEP_NODELIST")
        or env.get("SLURM_JOB_NODELIST")
        or env.get("SLURM_NODELIST", "127.0.0.1")
    )
    port = env.get("MASTER_PORT")
    return dict(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node,
        master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
        master_port=int(port) if port else SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", 0) % 20000,
        launcher="slurm",
        nodes=_int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1)),
    )


def _check_ranks(rank: int, world: int, local_rank: int, local_world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise LaunchError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    text = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", text)
    if not m:
        raise LaunchError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's compressed form: '4(x2),3' -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"cannot read SLURM tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else counts[-1]


def resolve_backend(requested: str, cuda_device_count: int) -> str:
    """auto -> nccl with CUDA, else gloo; nccl without CUDA is an error with the fix."""
    if requested == "auto":
        return "nccl" if cuda_device_count > 0 else "gloo"
    if requested == "nccl" and cuda_device_count == 0:
        raise LaunchError(
            "dist.backend = 'nccl' needs CUDA GPUs, but this process sees none. "
            "Use --set dist.backend=gloo (or auto) to run on the CPU."
        )
    if requested not in ("nccl", "gloo"):
        raise LaunchError(f"dist.backend {requested!r} is not one of auto, nccl, gloo")
    return requested


def _with_device(ctx: DistContext, requested: str, cuda_device_count: int) -> DistContext:
    backend = resolve_backend(requested, cuda_device_count)
    if cuda_device_count == 0:
        return replace(ctx, backend=backend, device="cpu")
    if ctx.local_world_size > cuda_device_count:
        raise LaunchError(
            f"{ctx.local_world_size} processes on this node but only {cuda_device_count} "
            "visible GPU(s): one GPU per process. Lower --nproc-per-node, list more ids in "
            "--gpus, or use --set dist.backend=gloo with CUDA_VISIBLE_DEVICES= to run on the CPU."
        )
    return replace(ctx, backend=backend, device=f"cuda:{ctx.local_rank}")
