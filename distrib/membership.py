"""Elastic membership under our launcher: nodes leave and join a running job (``--nnodes MIN:MAX``).

torch's elastic agent does the rendezvous; three things it leaves out are added here, in
the launcher process only (the agent runs in it), by wrapping the agent's worker start:

  - **the round, agreed.** Each rendezvous round has a number every node agrees on. The
    workers get it (``TORCHLAUNCH_RDZV_ROUND``) and prefix their process group's store keys
    with it. ``TORCHELASTIC_RESTART_COUNT`` is per node and diverges as soon as one node
    restarts for its own failure while another restarts because a node joined: the ranks
    then read a dead round's addresses ("Gloo connectFullMesh failed ... Connection
    refused"). The round also tells a worker that the job was running before it started
    (it resumes from the newest checkpoint, whatever this node's restart count).
  - **a node that left is waited for ``rejoin_s``, not 600 s.** torch's join timeout governs
    every round; after the first one it is shortened, so a job that cannot reach MIN nodes
    again ends with one line within that time instead of a bare RendezvousTimeoutError
    traceback ten minutes later.
  - **one line per change of membership**: ``round R: world size 2 -> 1 (nodes 2 -> 1)``.

Everything read here is torch's rendezvous handler state (``_state_holder.state.round``,
``_settings``); where a torch version lacks it the agent runs unchanged and the workers fall
back to the restart count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)
ROUND_VAR = "TORCHLAUNCH_RDZV_ROUND"


@dataclasses.dataclass
class Membership:
    """What the launcher remembers between rounds."""

    rejoin_s: float
    rounds: int = 0
    world: int = 0
    nodes: int = 0

    def started(self, worker_group: Any) -> None:
        """Called before the agent starts a round's workers: export the round, note changes."""
        handler = worker_group.spec.rdzv_handler
        number = rendezvous_round(handler)
        if number is not None:
            os.environ[ROUND_VAR] = str(number)  # the workers inherit the agent's environment
        world = worker_group.spec.local_world_size * int(worker_group.group_world_size or 1)
        nodes = int(worker_group.group_world_size or 1)
        if self.rounds and (world, nodes) != (self.world, self.nodes):
            log.warning(
                "round %s: world size %d -> %d (nodes %d -> %d); the workers resume from the last checkpoint",
                number,
                self.world,
                world,
                self.nodes,
                nodes,
            )
        if self.rounds == 0 and self.rejoin_s > 0:
            shorten_join(handler, self.rejoin_s)
        self.rounds += 1
        self.world, self.nodes = world, nodes


def rendezvous_round(handler: Any) -> int | None:
    """The round every node of this rendezvous agreed on (None: a handler without rounds)."""
    state = getattr(getattr(handler, "_state_holder", None), "state", None)
    number = getattr(state, "round", None)
    return number if isinstance(number, int) else None


def shorten_join(handler: Any, seconds: float) -> None:
    """Later rounds must form within ``seconds`` (the first one keeps torch's join timeout)."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousTimeout

    settings = getattr(handler, "_settings", None)
    if settings is None or not dataclasses.is_dataclass(settings):
        return
    old = settings.timeout
    timeout = RendezvousTimeout(
        join=timedelta(seconds=seconds), last_call=old.last_call, close=old.close, heartbeat=old.heartbeat
    )
    handler._settings = dataclasses.replace(settings, timeout=timeout)


def install(rejoin_s: float) -> Membership:
    """Wrap the agent's worker start (launcher process only; idempotent)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    member = Membership(rejoin_s)
    original = getattr(LocalElasticAgent._start_workers, "__wrapped__", LocalElasticAgent._start_workers)

    def start_workers(self: Any, worker_group: Any) -> Any:
        member.started(worker_group)
        return original(self, worker_group)

    start_workers.__wrapped__ = original  # type: ignore[attr-defined]
    LocalElasticAgent._start_workers = start_workers  # type: ignore[method-assign]
    return member
