"""Sharded pub/sub on a Redis Cluster: one ``Subscriber`` per node (``_NodeSubscriber``) behind one
``ClusterSubscriber`` with the same interface, which places each job channel on the node owning its slot and moves
it when the slot map changes (failover, resharding). ``subscriber_for`` picks the right one for a client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import RedisError

from broker_worker.protocol.aio import stop
from broker_worker.protocol.inbox import Inbox
from broker_worker.protocol.pubsub import MAX_BACKOFF_S, Subscriber
from broker_worker.protocol.subscription import Subscription, drop_reader

log = logging.getLogger("broker_worker.protocol.cluster_pubsub")


class _NodeSubscriber(Subscriber):
    """The shard channels one cluster node serves, on one connection of its own."""

    def __init__(self, cluster: ClusterSubscriber, node: ClusterNode) -> None:
        super().__init__(None)
        self.node = node
        self._cluster = cluster

    def add(self, channel: str, queues: set[Inbox], resync: bool) -> None:
        self._wanted[channel] = queues  # the set is shared with the ClusterSubscriber: one record of readers
        if resync:  # it moved here from another node: events published meanwhile were not delivered
            self._resync.add(channel)
        self._changed.set()
        self._start()

    def forget(self, channel: str) -> None:
        if self._wanted.pop(channel, None) is not None:
            self._resync.discard(channel)
            self._changed.set()

    def _batches(self, channels: list[str]) -> Iterator[list[str]]:
        """A cluster node takes several shard channels in one command only when they share a slot (CROSSSLOT
        otherwise); each job's channel has a slot of its own, so this is mostly one command per channel (sent
        back to back, without waiting for the replies)."""
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        for group in by_slot.values():
            yield from super()._batches(group)

    async def _new_connection(self) -> Any:
        connection = self.node.connection_class(**self.node.connection_kwargs)
        await connection.connect()  # type: ignore[no-untyped-call]
        return connection

    async def _before_reconnect(self) -> None:
        await self._cluster.reroute(self)


class ClusterSubscriber:
    """``Subscriber`` for a Redis Cluster: each channel is subscribed on the node serving its slot, one
    connection per node. After a connection fails, the cluster's slot map is read again and channels whose slot
    moved (a replica promoted, a resharding) are subscribed on their new node, whose readers get ``RESYNC``."""

    def __init__(self, redis: aioredis.RedisCluster) -> None:
        self._redis = redis
        self._wanted: dict[str, set[Inbox]] = {}
        self._where: dict[str, _NodeSubscriber] = {}
        self._nodes: dict[str, _NodeSubscriber] = {}
        self._homeless: set[str] = set()  # wanted before the slot map was known
        self._placing: asyncio.Task[None] | None = None

    def _shards(self) -> Iterable[_NodeSubscriber]:
        return list(self._nodes.values())

    @property
    def channels(self) -> int:
        return len(self._wanted)

    @property
    def connected(self) -> bool:
        return all(shard.connected for shard in self._shards() if shard._wanted)

    @property
    def settled(self) -> bool:
        return not self._homeless and all(shard.settled for shard in self._shards())

    @property
    def reconnects(self) -> int:
        return sum(shard.reconnects for shard in self._shards())

    def open(self, channel: str) -> Subscription:
        subscription = Subscription(self, channel)
        queues = self._wanted.setdefault(channel, set())
        queues.add(subscription.queue)
        if channel not in self._where:
            if self._redis.nodes_manager.slots_cache:
                self._place(channel, resync=False)
            else:  # the client has not read the slot map yet (no command sent so far): place it once it has
                self._homeless.add(channel)
                if self._placing is None or self._placing.done():
                    self._placing = asyncio.create_task(self._place_homeless())
        return subscription

    def remove(self, subscription: Subscription) -> None:
        if drop_reader(self._wanted, subscription):
            self._homeless.discard(subscription.channel)
            shard = self._where.pop(subscription.channel, None)
            if shard is not None:
                shard.forget(subscription.channel)

    async def wait_live(self, channel: str, timeout_s: float) -> bool:
        """Whether the channel is live on its node within ``timeout_s`` (following it if it moves meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            shard = self._where.get(channel)
            if shard is not None and await shard.wait_live(channel, min(left, 0.2)):
                return True
            if shard is None:
                await asyncio.sleep(min(left, 0.05))
        return False

    def _place(self, channel: str, resync: bool) -> None:
        node = self._redis.nodes_manager.get_node_from_slot(self._redis.keyslot(channel))
        shard = self._nodes.get(node.name)
        if shard is None:
            shard = self._nodes[node.name] = _NodeSubscriber(self, node)
        self._where[channel] = shard
        shard.add(channel, self._wanted[channel], resync)

    async def _place_homeless(self) -> None:
        backoff = 0.1
        while self._homeless:
            try:
                await self._redis.initialize()
                for channel in list(self._homeless):
                    self._homeless.discard(channel)
                    if channel in self._wanted and channel not in self._where:
                        self._place(channel, resync=False)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub: cannot read the cluster's slot map yet (%s)", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def reroute(self, shard: _NodeSubscriber) -> None:
        """After ``shard``'s connection failed: read the slot map again and move its channels that another node
        now serves."""
        try:
            await self._redis.nodes_manager.initialize()
        except (RedisError, OSError) as exc:  # the cluster is mid-failover: the next reconnect tries again
            log.warning("pub/sub: cannot read the cluster's slot map (%s)", exc)
            return
        for channel in list(shard._wanted):
            node = self._redis.nodes_manager.get_node_from_slot(self._redis.keyslot(channel))
            if node.name != shard.node.name:
                shard.forget(channel)
                log.info("pub/sub: channel %s moved from %s to %s", channel, shard.node.name, node.name)
                self._place(channel, resync=True)

    async def close(self) -> None:
        if self._placing is not None:
            await stop([self._placing])
        for shard in self._shards():
            await shard.close()


def subscriber_for(redis: aioredis.Redis | aioredis.RedisCluster) -> Subscriber | ClusterSubscriber:
    """The process's pub/sub subscriber for this client (one Redis, or one connection per cluster node)."""
    if isinstance(redis, aioredis.RedisCluster):
        return ClusterSubscriber(redis)
    return Subscriber(redis)
