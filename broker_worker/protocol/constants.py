"""Every Redis key, channel, field name and default timing of the protocol, in one place.

Worker, gateway and the Python client import these; docs/protocol.md documents the same names. A job's own
keys share the hash tag ``{job_id}`` so a Lua script may touch all of them on Redis Cluster.
"""

from __future__ import annotations

KEY_PREFIX = "ivl"

#: Consumer group every worker of a model joins.
CONSUMER_GROUP = "workers"
#: Field of a job stream entry that holds the job's JSON.
JOB_FIELD = "job"
#: Field of a replay-stream entry (and the whole pub/sub payload) holding one event's JSON.
EVENT_FIELD = "e"

#: Dead-letter stream: entries that could not be run, with the reason.
DEAD_LETTER_STREAM = f"{KEY_PREFIX}:dead"
#: Sorted set of live worker ids (score = expiry, unix ms); each id also has a TTL'd health key.
WORKERS_INDEX = f"{KEY_PREFIX}:workers"

# Defaults (seconds unless the name says otherwise); every one is overridable through settings.
LEASE_S = 15.0  # a pending job idle this long is taken over by another worker
LEASE_RENEW_S = 3.0  # how often a live worker renews the lease of its running jobs
HEARTBEAT_S = 2.0  # how often a worker refreshes its health key
HEALTH_TTL_S = 10.0  # a worker with no heartbeat for this long is dead
JOB_TTL_S = 3600  # per-job keys (state, replay, cancel) expire this long after their last write
REPLAY_MAXLEN = 20_000  # cap of a job's replay stream (events, not tokens)
DEAD_LETTER_MAXLEN = 10_000
MAX_ATTEMPTS = 3  # deliveries of one job before it is dead-lettered
STREAM_INTERVAL_MS = 20  # the worker coalesces deltas produced within this window into one event
PUBLISH_WINDOW_MS = 10.0  # a busy worker publishes its jobs' events in one call at most this often (publish_batch.py)
PUBLISH_BATCH = 20  # … and sooner when its event rate fills a call with this many events (publish_batch.py)
CONSUMER_FORGET_S = 3600.0  # a group consumer idle this long with nothing pending is deleted
SHUTDOWN_GRACE_S = 20.0  # on SIGTERM, running jobs get this long to finish before they are handed back
STALL_TIMEOUT_S = 300.0  # an engine that makes no text this long is hung: the worker hands back its jobs and exits


#: Priority lanes: each model has one job stream per lane, and a worker takes a batch job only when no interactive
#: job of its model waits (broker_worker/lanes.py). Everything the gateway queues is interactive.
INTERACTIVE = "interactive"
BATCH = "batch"
LANES = (INTERACTIVE, BATCH)


def job_stream(model: str, lane: str = INTERACTIVE) -> str:
    """The stream a model's jobs of one lane are queued on: ``ivl:jobs:<model>`` (interactive) or
    ``ivl:jobs:<model>:batch``. Each has its own consumer group ``workers``."""
    stream = f"{KEY_PREFIX}:jobs:{model}"
    return stream if lane == INTERACTIVE else f"{stream}:{lane}"


def job_stream_model(stream: str) -> str:
    """The model whose job stream (of either lane) this is."""
    return stream.removeprefix(f"{KEY_PREFIX}:jobs:").removesuffix(f":{BATCH}")


def job_state_key(job_id: str) -> str:
    """Hash: status, owner (fencing token), seq, attempts, entry, worker."""
    return f"{KEY_PREFIX}:job:{{{job_id}}}:state"


def job_events_key(job_id: str) -> str:
    """Capped stream holding every event of the job, terminal one included (the replay record)."""
    return f"{KEY_PREFIX}:job:{{{job_id}}}:events"


def job_channel(job_id: str) -> str:
    """Pub/sub channel where each event is published as it is appended to the replay record.

    lua/record_event.lua (publish and start) derives it from the state key (``:state`` -> ``:chan``): keep the two
    in step.
    """
    return f"{KEY_PREFIX}:job:{{{job_id}}}:chan"


def job_cancel_key(job_id: str) -> str:
    """String key; any client cancels a job with ``SET <key> 1 EX 3600``."""
    return f"{KEY_PREFIX}:job:{{{job_id}}}:cancel"


def worker_health_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}:worker:{worker_id}"


def worker_drain_key(worker_id: str) -> str:
    """String key; exists = the worker is asked to drain (``broker-admin drain``): it stops taking jobs, finishes
    or hands back its running ones as on SIGTERM, then exits. Checked every heartbeat."""
    return f"{KEY_PREFIX}:worker:{worker_id}:drain"
