"""DistContext.from_env over torchrun, SLURM and bare environments, rank by rank."""

from __future__ import annotations

import pytest

from distrib.context import DistContext, first_slurm_host, resolve_backend, slurm_tasks_on_node
from distrib.errors import LaunchError


def torchrun_env(rank: int, world: int = 4, local_world: int = 2) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % local_world),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "GROUP_RANK": str(rank // local_world),
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
    }


def test_bare_environment_is_one_process_on_cpu() -> None:
    ctx = DistContext.from_env({})
    assert (ctx.rank, ctx.world_size, ctx.launcher, ctx.device, ctx.backend) == (
        0,
        1,
        "single",
        "cpu",
        "gloo",
    )
    assert ctx.is_main and not ctx.distributed


def test_bare_environment_with_a_gpu_uses_cuda0_and_nccl() -> None:
    ctx = DistContext.from_env({}, cuda_device_count=1)
    assert ctx.device == "cuda:0" and ctx.backend == "nccl"


@pytest.mark.parametrize("rank", range(4))
def test_torchrun_two_nodes_every_rank(rank: int) -> None:
    ctx = DistContext.from_env(torchrun_env(rank), cuda_device_count=2)
    assert ctx.rank == rank and ctx.world_size == 4 and ctx.local_world_size == 2
    assert ctx.local_rank == rank % 2 and ctx.node_rank == rank // 2
    assert ctx.device == f"cuda:{rank % 2}" and ctx.backend == "nccl"
    assert (ctx.master_addr, ctx.master_port, ctx.launcher) == ("10.0.0.1", 29400, "torchrun")
    assert ctx.is_main == (rank == 0)


def test_torchrun_on_cpu_is_gloo() -> None:
    ctx = DistContext.from_env(torchrun_env(1))
    assert ctx.device == "cpu" and ctx.backend == "gloo"


def test_torchrun_wins_over_slurm() -> None:
    env = {**torchrun_env(3), "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert DistContext.from_env(env).rank == 3


def slurm_env(procid: int) -> dict[str, str]:
    return {
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % 4),
        "SLURM_NODEID": str(procid // 4),
        "SLURM_NTASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }


@pytest.mark.parametrize("procid", range(8))
def test_slurm_every_task(procid: int) -> None:
    ctx = DistContext.from_env(slurm_env(procid), cuda_device_count=4)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.node_rank) == (
        procid,
        8,
        procid % 4,
        4,
        procid // 4,
    )
    assert ctx.master_addr == "gpu07" and ctx.launcher == "slurm"
    assert ctx.master_port == 15000 + 123456 % 20000  # same on every task, no exchange needed


def test_slurm_respects_explicit_master_variables_and_step_values() -> None:
    env = {
        **slurm_env(1),
        "MASTER_ADDR": "head",
        "MASTER_PORT": "1234",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
    }
    ctx = DistContext.from_env(env)
    assert (ctx.master_addr, ctx.master_port, ctx.world_size, ctx.local_world_size) == ("head", 1234, 2, 2)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu[03-05,9],cpu1", "gpu03"),
        ("node7", "node7"),
        ("a1,b2", "a1"),
        ("n[1,3]", "n1"),
        ("rack1-n[010-012]", "rack1-n010"),
    ],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_slurm_tasks_per_node_compressed_forms() -> None:
    assert [slurm_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    assert slurm_tasks_on_node("2", 0) == 2
    with pytest.raises(LaunchError):
        slurm_tasks_on_node("four", 0)


def test_partial_torchrun_environment_is_an_error_naming_the_missing_variables() -> None:
    with pytest.raises(LaunchError) as e:
        DistContext.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    assert "MASTER_ADDR" in str(e.value) and "MASTER_PORT" in str(e.value)


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "'x'"),
    ],
)
def test_inconsistent_ranks(env: dict[str, str], needle: str) -> None:
    with pytest.raises(LaunchError) as e:
        DistContext.from_env(env)
    assert needle in str(e.value)


def test_nccl_without_cuda_is_an_error_with_the_fix() -> None:
    with pytest.raises(LaunchError) as e:
        DistContext.from_env({}, backend="nccl")
    assert "nccl" in str(e.value) and "dist.backend=gloo" in str(e.value)


def test_more_local_processes_than_gpus_is_an_error() -> None:
    with pytest.raises(LaunchError) as e:
        DistContext.from_env(torchrun_env(0, world=4, local_world=4), cuda_device_count=2)
    assert "4 processes" in str(e.value) and "2 visible GPU" in str(e.value)


def test_resolve_backend() -> None:
    assert resolve_backend("auto", 0) == "gloo"
    assert resolve_backend("auto", 2) == "nccl"
    assert resolve_backend("gloo", 2) == "gloo"
    with pytest.raises(LaunchError):
        resolve_backend("mpi", 2)


def test_context_is_frozen() -> None:
    ctx = DistContext.from_env({})
    with pytest.raises(AttributeError):
        ctx.rank = 1  # type: ignore[misc]
