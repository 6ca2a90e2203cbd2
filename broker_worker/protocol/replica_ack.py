"""``--min-replicas-ack N``: after queueing a job, ``WAIT N timeout`` so that an accepted job is on N replicas
before the client is told it is queued, and a failover of the primary does not lose it.

``WAIT`` counts the writes of the connection it is sent on, so it must follow the writes on that same connection:
here both go in one pipeline. On one Redis (or a Sentinel-managed primary) that is one connection. On a cluster
the writes of a submission go to the nodes owning their keys' slots; each node gets its writes and then its own
``WAIT`` in one batch on one of its connections (a cluster pipeline sends each node's commands together, in
order, on one connection). A write that was redirected meanwhile (``MOVED``: the slot moved) went to another
connection, so its node's ``WAIT`` proves nothing: it is counted as not acknowledged.

A job that N replicas did not acknowledge in time is still queued (it runs as usual): it is reported with a
warning line and a count (the gateway exports it as a metric), since a failover now could lose it. The images a
gateway stores by reference before queueing a job are waited for the same way, and reported apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker_worker.protocol.connections import is_cluster

log = logging.getLogger("broker_worker.protocol.replica_ack")

#: One write of a submission: the key that routes it on a cluster, and the command.
Write = tuple[str, Sequence[Any]]


@dataclass
class ReplicaAck:
    """How many replicas must acknowledge a submission, how long to wait for them, and how many did not."""

    replicas: int = 0
    timeout_s: float = 1.0
    #: Called with the model and what was written (``job`` or ``images``) each time the acknowledgement did not
    #: come in time (the gateway's metric).
    on_short: Callable[[str, str], None] | None = None
    #: Writes (a job, or a job's images) left without the acknowledgement so far.
    short: int = field(default=0, init=False)

    @property
    def wanted(self) -> bool:
        return self.replicas > 0

    @property
    def timeout_ms(self) -> int:
        return max(1, round(self.timeout_s * 1000))

    def check(self, job_id: str, model: str, acked: int, what: str = "job") -> None:
        """Report a job (or its images) that fewer than ``replicas`` replicas acknowledged; it stays queued."""
        if acked >= self.replicas:
            return
        self.short += 1
        written = f"job {job_id} queued" if what == "job" else f"{what} of job {job_id} stored"
        log.warning(
            "%s but acknowledged by %d of %d replicas within %.1f s: a failover now could lose it",
            written,
            acked,
            self.replicas,
            self.timeout_s,
        )
        if self.on_short is not None:
            self.on_short(model, what)


async def write_and_wait(redis: Any, writes: list[Write], ack: ReplicaAck) -> tuple[list[Any], int]:
    """Run ``writes`` (asyncio client) each followed, on the same connection, by ``WAIT``; their replies and the
    number of replicas that acknowledged all of them (the smallest count over the nodes written)."""
    if is_cluster(redis):
        await redis.initialize()  # the slot map (a no-op once read)
        nodes = [redis.get_node_from_key(key) for key, _ in writes]
        async with redis.pipeline() as pipe:
            _cluster_commands(pipe, writes, nodes, ack)
            replies = await pipe.execute()
        return _cluster_outcome(redis, writes, nodes, replies)
    async with redis.pipeline(transaction=False) as pipe:
        for _, command in writes:
            pipe.execute_command(*command)
        pipe.execute_command("WAIT", ack.replicas, ack.timeout_ms)
        replies = await pipe.execute()
    return replies[:-1], int(replies[-1])


def write_and_wait_sync(redis: Any, writes: list[Write], ack: ReplicaAck) -> tuple[list[Any], int]:
    """``write_and_wait`` for a blocking client."""
    if is_cluster(redis):
        nodes = [redis.get_node_from_key(key) for key, _ in writes]
        with redis.pipeline() as pipe:
            _cluster_commands(pipe, writes, nodes, ack)
            replies = pipe.execute()
        return _cluster_outcome(redis, writes, nodes, replies)
    with redis.pipeline(transaction=False) as pipe:
        for _, command in writes:
            pipe.execute_command(*command)
        pipe.execute_command("WAIT", ack.replicas, ack.timeout_ms)
        replies = pipe.execute()
    return replies[:-1], int(replies[-1])


def _cluster_commands(pipe: Any, writes: list[Write], nodes: list[Any], ack: ReplicaAck) -> None:
    """Each write pinned to the node owning its key, followed there by a ``WAIT`` (``WAIT`` has no key: it goes
    where it is told). The pipeline sends one node's commands in order on one connection."""
    for (_, command), node in zip(writes, nodes, strict=True):
        pipe.execute_command(*command, target_nodes=node)
        pipe.execute_command("WAIT", ack.replicas, ack.timeout_ms, target_nodes=node)


def _cluster_outcome(redis: Any, writes: list[Write], nodes: list[Any], replies: list[Any]) -> tuple[list[Any], int]:
    acked = []
    for k, ((key, _), node) in enumerate(zip(writes, nodes, strict=True)):
        moved = redis.get_node_from_key(key).name != node.name  # the write went elsewhere: its WAIT proves nothing
        acked.append(0 if moved else int(replies[2 * k + 1]))
    return replies[0::2], min(acked)
