"""The job-side Lua scripts and stream caps (protocol/jobs.py and submission.py, lua/*), in-process against a real
redis-server.

Each test drives the product's own code (JobStore, queue_commands, an in-process Worker) and reads Redis back.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis
import redis.asyncio as aioredis

from broker_worker.handoff import Handoff
from broker_worker.model.fake_engine import FakeEngine
from broker_worker.protocol import constants as c
from broker_worker.protocol import health, submission
from broker_worker.protocol.client import AsyncClient
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.errors import ErrorCode
from broker_worker.protocol.inbox import Inbox
from broker_worker.protocol.jobs import CANCELLED, FENCED, Announce, JobStore
from broker_worker.protocol.messages import Cancelled, Delta, Done, Job, Usage, WorkerHealth
from broker_worker.protocol.readers import job_readers_key
from broker_worker.protocol.states import Ownership
from broker_worker.settings import WorkerSettings
from broker_worker.worker import Worker
from tests.helpers import RedisServer, job, wait_for

# Redis trims a `MAXLEN ~ N` stream by whole radix-tree nodes (stream-node-max-entries, 100 by default).
NODE = 100


@pytest.fixture
async def ar(redis_server: RedisServer, r: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the session's redis-server, flushed by ``r``."""
    client = async_redis(redis_server.url)
    yield client
    await client.aclose()


async def test_publish_and_renew_are_fenced_after_a_takeover(ar: aioredis.Redis, r: redis.Redis) -> None:
    store = JobStore(ar)
    first = await store.start("fence", "1-0", "token-a", "worker-a", 0)
    assert (first.run, first.attempts, first.resumed) == (True, 1, False)
    assert await store.publish("fence", "token-a", Delta(text="one "), 1) == 1
    # XAUTOCLAIM hands the same entry to another worker: it installs a new token and counts the attempt.
    second = await store.start("fence", "1-0", "token-b", "worker-b", 0)
    assert (second.run, second.attempts, second.resumed) == (True, 2, True)
    assert await store.publish("fence", "token-a", Delta(text="stale "), 2) == FENCED
    assert await store.renew("fence", "token-a") == 0
    assert await store.renew("fence", "token-b") == 1
    assert await store.publish("fence", "token-b", Delta(text="two "), 2) == 2
    r.set(c.job_cancel_key("fence"), 1)
    assert await store.renew("fence", "token-b") == 2
    assert await store.publish("fence", "token-b", Delta(text="late "), 3) == CANCELLED
    assert await store.publish("fence", "token-b", Cancelled(), 3) == 3  # the terminal event still goes in
    texts = [json.loads(f["e"]).get("text") for _, f in r.xrange(c.job_events_key("fence"))]
    assert texts == ["one ", "two ", None]
    assert r.hgetall(c.job_state_key("fence")) | {"started_ms": "0", "claimed_ms": "0"} == {
        "status": "cancelled",
        "owner": "",
        "seq": "3",
        "attempts": "2",
        "entry": "1-0",
        "worker": "worker-b",
        "started_ms": "0",
        "claimed_ms": "0",
        "ended_by": "token-b",
    }


async def test_a_finished_or_running_id_is_a_duplicate(ar: aioredis.Redis) -> None:
    store = JobStore(ar)
    assert (await store.start("twice", "1-0", "a", "w", 0)).run
    running = await store.start("twice", "2-0", "b", "w", 0)  # another entry of a running id
    assert (running.run, running.duplicate_of) == (False, "running")
    await store.publish("twice", "a", Cancelled(), 1)
    finished = await store.start("twice", "1-0", "c", "w", 0)
    assert (finished.run, finished.duplicate_of) == (False, "cancelled")


async def test_hand_back_is_not_an_attempt_and_retry_is(ar: aioredis.Redis, r: redis.Redis) -> None:
    store = JobStore(ar)
    await store.start("back", "1-0", "a", "w", 0)
    assert await store.release("back", "wrong-token") is False
    assert await store.release("back", "a") is True  # SIGTERM hand-back
    assert (await store.start("back", "2-0", "b", "w", 0)).attempts == 1
    assert await store.release("back", "b", failed_attempt=True) is True  # transient error: counted
    assert (await store.start("back", "3-0", "c", "w", 0)).attempts == 2
    assert r.hget(c.job_state_key("back"), "status") == "running"


async def test_two_workers_handed_one_entry_at_once_count_one_attempt(ar: aioredis.Redis, r: redis.Redis) -> None:
    """After a Redis stall, a second worker's XAUTOCLAIM can take an entry whose first claimer's start was still
    waiting: taking over that brand-new run is not a failed attempt (it used to be, and a job that met a kill, a
    hand-back and such a stall was dead-lettered). A take-over of a run older than the window still counts."""
    store = JobStore(ar)
    assert (await store.start("twice", "1-0", "a", "w1", 0, fresh_run_ms=60_000)).attempts == 1
    second = await store.start("twice", "1-0", "b", "w2", 0, fresh_run_ms=60_000)
    assert (second.run, second.attempts) == (True, 1)
    assert r.hget(c.job_state_key("twice"), "owner") == "b"  # the first run is fenced off all the same
    assert (await store.start("twice", "1-0", "c", "w3", 0, fresh_run_ms=0)).attempts == 2  # a real take-over


async def test_events_of_many_jobs_go_in_one_call_each_applied_alone(ar: aioredis.Redis, r: redis.Redis) -> None:
    """A worker's concurrent publishes share one script call (protocol/publish_batch.py), yet each keeps its own
    fencing, expected seq and cancel check, and its own result."""
    store = JobStore(ar)
    for k in range(6):
        await store.start(f"b{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    await store.start("b1", "2-0", "token-new", "worker-b", 0)  # b1 taken over: token-1 is fenced
    r.set(c.job_cancel_key("b2"), 1)
    assert await store.publish("b3", "token-3", Delta(text="first "), 1) == 1
    r.config_resetstat()
    results = await asyncio.gather(
        *(store.publish(f"b{k}", f"token-{k}", Delta(text=f"text {k} "), 1) for k in range(6))
    )
    assert results == [1, FENCED, CANCELLED, 1, 1, 1]  # b3: a repeat of its seq 1, applied once already
    calls = int(r.info("commandstats")["cmdstat_evalsha"]["calls"])
    assert calls == 1, f"{calls} script calls for 6 concurrent events"
    texts = {k: [json.loads(f["e"])["text"] for _, f in r.xrange(c.job_events_key(f"b{k}"))] for k in range(6)}
    assert texts == {0: ["text 0 "], 1: [], 2: [], 3: ["first "], 4: ["text 4 "], 5: ["text 5 "]}


async def test_a_busy_worker_publishes_at_most_once_per_window(ar: aioredis.Redis, r: redis.Redis) -> None:
    """``--publish-window-ms``: the first event after a quiet spell goes at once; events that come within the
    window after a call began share the next call."""
    store = JobStore(ar, publish_window_s=0.5)
    for k in range(7):
        await store.start(f"w{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    assert await store.publish("w6", "token-6", Delta(text="loads the script "), 1) == 1
    await asyncio.sleep(0.6)  # a quiet spell
    r.config_resetstat()
    assert await store.publish("w0", "token-0", Delta(text="first "), 1) == 1
    assert int(r.info("commandstats")["cmdstat_evalsha"]["calls"]) == 1
    later = []
    for k in range(1, 6):  # one by one, as tokens of separate jobs come: they wait for the window and go together
        later.append(asyncio.create_task(store.publish(f"w{k}", f"token-{k}", Delta(text="next "), 1)))
        await asyncio.sleep(0.01)
    assert await asyncio.gather(*later) == [1] * 5
    assert int(r.info("commandstats")["cmdstat_evalsha"]["calls"]) == 2


async def test_a_busy_workers_window_shrinks_to_its_event_rate(ar: aioredis.Redis, r: redis.Redis) -> None:
    """``--publish-batch``: a busy worker's calls aim at that many events; at 100 events/s and a batch of 4 it
    waits ~40 ms between calls, not the whole ``--publish-window-ms`` (500 ms here)."""
    store = JobStore(ar, publish_window_s=0.5, publish_batch=4)
    for k in range(100):
        await store.start(f"a{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    r.config_resetstat()
    steady = []
    for k in range(100):  # 1 s of events, 10 ms apart
        steady.append(asyncio.create_task(store.publish(f"a{k}", f"token-{k}", Delta(text="x "), 1)))
        await asyncio.sleep(0.01)
    assert await asyncio.gather(*steady) == [1] * 100
    calls = int(r.info("commandstats")["cmdstat_evalsha"]["calls"])
    assert 12 <= calls <= 50, f"{calls} calls for 100 events in 1 s (a fixed 500 ms window: 5; one each: 100)"


async def test_text_that_comes_while_a_call_is_due_waits_for_it(ar: aioredis.Redis, r: redis.Redis) -> None:
    """broker_worker/handoff.py: a quiet worker's first token reaches the loop at once; tokens that come while a
    call is in flight or its window runs are not handed over one by one but all at once, just before the next
    call, which carries them all (jobs past their first text: a job's first text always wakes the loop)."""
    handoff = Handoff()
    store = JobStore(ar, publish_window_s=0.3, collector=handoff)
    for k in range(6):
        await store.start(f"h{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    loop = asyncio.get_running_loop()
    handed: list[float] = []
    published: list[asyncio.Future[int]] = []
    seqs = [0] * 6

    def sink(k: int) -> Callable[[str], None]:
        def take(text: str) -> None:  # on the loop, as Relay._add
            handed.append(loop.time())
            seqs[k] += 1
            published.append(asyncio.ensure_future(store.publish(f"h{k}", f"token-{k}", Delta(text=text), seqs[k])))

        return take

    feeds = [handoff.feeder(sink(k)) for k in range(6)]
    await asyncio.to_thread(lambda: [feeds[k]("earlier ") for k in range(1, 6)])  # past their first text
    await asyncio.wait_for(asyncio.gather(*published), 10)
    await asyncio.sleep(0.35)  # a quiet spell
    handed.clear()
    published.clear()
    r.config_resetstat()
    began = loop.time()
    await asyncio.to_thread(feeds[0], "first ")  # from an engine thread
    await asyncio.sleep(0.05)
    assert len(handed) == 1 and handed[0] - began < 0.05  # at once: no call was due

    def engine() -> None:
        for k in range(1, 6):
            feeds[k]("next ")
            time.sleep(0.02)

    await asyncio.to_thread(engine)  # within the window of the first call
    assert len(handed) == 1, "tokens were handed over one by one while a call was due"
    await asyncio.sleep(0.4)
    assert len(handed) == 6 and max(handed[1:]) - min(handed[1:]) < 0.01  # all at once
    assert min(handed[1:]) - began >= 0.29  # when the window of the first call ended
    assert await asyncio.gather(*published) == [1] + [2] * 5
    assert int(r.info("commandstats")["cmdstat_evalsha"]["calls"]) == 2


async def test_the_engine_thread_that_wakes_the_loop_waits_until_its_call_is_written(
    ar: aioredis.Redis, r: redis.Redis
) -> None:
    """broker_worker/handoff.py: an engine holds the GIL while it computes, so the thread that woke the loop gives
    it up until the call carrying its text is written (each loop step would wait for a forced GIL switch). Text
    that makes no call due (a job coalescing its deltas keeps it) lets the thread go on at once."""
    order: list[str] = []

    class Watched(Handoff):
        def written(self) -> None:
            order.append("written")
            super().written()

    handoff = Watched(yield_s=30)  # never the timeout: the order below is the mechanism's, on any machine
    store = JobStore(ar, collector=handoff)
    await store.start("y0", "1-0", "token-0", "worker-a", 0)
    published: list[asyncio.Future[int]] = []
    kept: list[str] = []
    publish = handoff.feeder(lambda text: published.append(store.send_text("y0", "token-0", text, 1)))
    keep = Handoff(yield_s=30).feeder(kept.append)  # no publisher: nothing else could let its thread go on

    def engine(feed: Callable[[str], None], text: str) -> None:
        feed(text)
        order.append("engine goes on")

    await asyncio.wait_for(asyncio.to_thread(engine, publish, "first "), 10)
    assert order[0] == "written" and "engine goes on" in order  # released by the write (then the loop may go on)
    assert await published[0] == 1
    await asyncio.wait_for(asyncio.to_thread(engine, keep, "kept "), 10)  # not 30 s: no call was due
    assert kept == ["kept "]


async def test_a_runs_first_delta_ends_a_busy_workers_window(ar: aioredis.Redis, r: redis.Redis) -> None:
    """``urgent`` (the relay's first delta of a run): a busy worker's publisher, waiting out its window, sends at
    once, with what else is pending; other events wait for the window (30 s here: never within this test)."""
    store = JobStore(ar, publish_window_s=30)
    for k in range(3):
        await store.start(f"u{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    assert await store.publish("u0", "token-0", Delta(text="first "), 1) == 1  # after a quiet spell: at once
    r.config_resetstat()
    later = store.send_text("u1", "token-1", "steady ", 1)  # within the window: waits for it
    await asyncio.sleep(0)
    assert not later.done()
    first = store.send_text("u2", "token-2", "first ", 1, urgent=True)
    assert await asyncio.wait_for(asyncio.gather(first, later), 10) == [1, 1]
    assert int(r.info("commandstats")["cmdstat_evalsha"]["calls"]) == 1  # both in one call


async def test_a_jobs_first_text_wakes_a_busy_loop(ar: aioredis.Redis) -> None:
    """broker_worker/handoff.py: while a call is due (``hold``), text waits for its ``collect``, except a job's
    first text: its client waits for its first token."""
    handoff = Handoff()
    got: list[str] = []
    feed = handoff.feeder(got.append)
    handoff.hold()
    feed("first ")  # on the loop's own thread here: a busy loop's engine thread does not wait for the call
    for _ in range(3):
        await asyncio.sleep(0)
    assert got == ["first "]
    handoff.hold()
    feed("second ")
    for _ in range(3):
        await asyncio.sleep(0)
    assert got == ["first "], "a later text woke the loop while a call was due"
    handoff.collect()
    assert got == ["first ", "second "]


async def test_text_handed_over_as_the_publisher_goes_idle_is_published(ar: aioredis.Redis, r: redis.Redis) -> None:
    """Text may reach the collector at any time, the publisher's last ``collect`` too (as it goes idle, an engine
    thread's token may just have come): every event submitted then is published. Here the first two collects
    (before and after the first call) find nothing, the last one as the publisher goes idle hands over a text, and
    each later one another. The publisher used to finish without that event (its task was still running, so
    ``submit`` started no new one), and the job's stream stalled for good."""
    published: list[asyncio.Future[int]] = []
    collects = 0
    all_handed = asyncio.Event()

    class LateText:
        def hold(self) -> None:
            pass

        def written(self) -> None:
            pass

        def collect(self) -> None:
            nonlocal collects
            collects += 1
            if collects > 2 and len(published) < 5:
                k = len(published)
                published.append(store.send_text(f"i{k}", f"token-{k}", f"text {k} ", 1))
            if len(published) == 5:
                all_handed.set()

    store = JobStore(ar, collector=LateText())
    for k in range(5):
        await store.start(f"i{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    published.append(store.send_text("i0", "token-0", "text 0 ", 1))
    await asyncio.wait_for(all_handed.wait(), 10)
    results = await asyncio.wait_for(asyncio.gather(*published), 10)
    assert results == [1] * 5
    texts = [[json.loads(f["e"])["text"] for _, f in r.xrange(c.job_events_key(f"i{k}"))] for k in range(5)]
    assert texts == [[f"text {k} "] for k in range(5)]


async def test_a_worker_renews_all_its_runs_in_one_round_trip(ar: aioredis.Redis, r: redis.Redis) -> None:
    store = JobStore(ar)
    for k in range(6):
        await store.start(f"n{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    await store.start("n1", "2-0", "token-new", "worker-b", 0)  # n1 taken over
    r.set(c.job_cancel_key("n2"), 1)
    r.expire(c.job_state_key("n0"), 100)
    r.config_resetstat()
    states = await store.renew_many([(f"n{k}", f"token-{k}") for k in range(6)])
    reads = int(r.info("stats")["total_reads_processed"])  # the renewals' reads and this INFO's
    owned, taken, cancelled = Ownership.OWNED, Ownership.TAKEN_OVER, Ownership.OWNED_BUT_CANCELLED
    assert states == [owned, taken, cancelled, owned, owned, owned]
    assert reads <= 3, f"{reads} socket reads for 6 renewals (one by one: 7)"
    assert 3590 < r.ttl(c.job_state_key("n0")) <= c.JOB_TTL_S  # renewed


async def test_a_delta_published_as_text_is_the_same_event(ar: aioredis.Redis, r: redis.Redis) -> None:
    """``publish_text`` (the relay's per-token path) writes the bytes ``publish(Delta(...))`` writes."""
    store = JobStore(ar)
    text = 'quote " backslash \\ newline \n tab \t bell \x07 é 中 🙂 </script>'
    for k, how in enumerate(("model", "text")):
        await store.start(f"t{k}", f"{k + 1}-0", "t", "w", 0)
        if how == "model":
            assert await store.publish(f"t{k}", "t", Delta(text=text), 1) == 1
        else:
            assert await store.publish_text(f"t{k}", "t", text, 1) == 1
    raw = [r.xrange(c.job_events_key(f"t{k}"))[0][1]["e"] for k in range(2)]
    assert raw[0] == raw[1] and json.loads(raw[1]) == {"seq": 1, "type": "delta", "text": text}


async def test_a_script_redis_lost_is_loaded_again(ar: aioredis.Redis, r: redis.Redis) -> None:
    """The publish call is packed by hand (publish_batch.py): after SCRIPT FLUSH (as after a restart without
    persistence) it loads the script again and sends the call once more, applied once."""
    store = JobStore(ar)
    for k in range(3):
        await store.start(f"s{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    assert await store.publish("s0", "token-0", Delta(text="before "), 1) == 1
    r.script_flush()
    results = await asyncio.gather(
        *(store.publish(f"s{k}", f"token-{k}", Delta(text="after "), 1 + (k == 0)) for k in range(3))
    )
    assert results == [2, 1, 1]
    texts = [json.loads(f["e"])["text"] for _, f in r.xrange(c.job_events_key("s0"))]
    assert texts == ["before ", "after "]


async def test_the_publisher_keeps_its_connection_and_replaces_a_lost_one(ar: aioredis.Redis, r: redis.Redis) -> None:
    """publish_batch.py keeps one connection between calls (no pool round per call); when Redis drops it, the
    call on it fails (its caller retries, as the relay does) and the next call has a new connection."""
    store = JobStore(ar, publish_window_s=0)
    for k in range(2):
        await store.start(f"c{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    assert await store.publish("c0", "token-0", Delta(text="one "), 1) == 1
    before = {client["id"] for client in r.client_list()}
    for seq in (2, 3):
        assert await store.publish("c0", "token-0", Delta(text="more "), seq) == seq
    assert {client["id"] for client in r.client_list()} == before  # no connection taken anew per call
    r.client_kill_filter(_type="normal", skipme=True)  # every connection but this test's own
    for attempt in range(3):
        try:
            assert await store.publish("c1", "token-1", Delta(text="after "), 1) == 1
            break
        except (redis.exceptions.ConnectionError, ConnectionError, OSError):
            assert attempt == 0, "the publisher did not replace its lost connection"
    texts = [json.loads(f["e"])["text"] for _, f in r.xrange(c.job_events_key("c1"))]
    assert texts == ["after "]


async def test_a_script_error_fails_only_its_own_event(ar: aioredis.Redis, r: redis.Redis) -> None:
    store = JobStore(ar)
    for k in range(3):
        await store.start(f"e{k}", f"{k + 1}-0", f"token-{k}", "worker-a", 0)
    r.set(c.job_events_key("e1"), "not a stream")  # XADD on it is a WRONGTYPE error inside the script
    results = await asyncio.gather(
        *(store.publish(f"e{k}", f"token-{k}", Delta(text="x "), 1) for k in range(3)), return_exceptions=True
    )
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], redis.ResponseError) and "WRONGTYPE" in str(results[1])


async def test_replay_stream_is_capped_at_20000_events(ar: aioredis.Redis, r: redis.Redis) -> None:
    store = JobStore(ar)
    await store.start("long", "1-0", "t", "w", 0)
    total = c.REPLAY_MAXLEN + 3 * NODE
    for seq in range(1, total + 1):  # one publish in flight at a time, as a run publishes
        await store.publish("long", "t", Delta(text="x"), seq)
    key = c.job_events_key("long")
    assert c.REPLAY_MAXLEN == 20_000
    assert c.REPLAY_MAXLEN <= r.xlen(key) < c.REPLAY_MAXLEN + NODE
    oldest, newest = (json.loads(r.xrange(key, count=1)[0][1]["e"]), json.loads(r.xrevrange(key, count=1)[0][1]["e"]))
    assert oldest["seq"] > 1 and newest["seq"] == total  # the oldest events went, seq numbering did not
    assert 3590 < r.ttl(key) <= c.JOB_TTL_S


async def test_queued_jobs_are_marked_and_never_trimmed(r: redis.Redis) -> None:
    """Every queued entry stays until a worker finishes it (no MAXLEN: a trim would drop queued and running
    jobs; ../shared/reproductions/maxlen_trim.py shows the 100,000-entry case); each id is marked queued."""
    with r.pipeline(transaction=False) as pipe:
        for k in range(2500):
            submission.queue_commands(pipe, Job.model_validate(job(f"cap{k}")))
        pipe.execute()
    assert r.xlen(c.job_stream("fake")) == 2500
    assert r.xinfo_stream(c.job_stream("fake"))["max-deleted-entry-id"] == "0-0"
    assert r.hgetall(c.job_state_key("cap2499")) == {"status": "queued"}
    assert 3590 < r.ttl(c.job_state_key("cap2499")) <= c.JOB_TTL_S


async def test_dead_letter_stream_is_capped(
    monkeypatch: pytest.MonkeyPatch, ar: aioredis.Redis, r: redis.Redis
) -> None:
    assert c.DEAD_LETTER_MAXLEN == 10_000  # the documented cap; the worker below runs with a smaller one
    monkeypatch.setattr(c, "DEAD_LETTER_MAXLEN", 300)
    with r.pipeline(transaction=False) as pipe:
        for k in range(800):
            pipe.xadd(c.job_stream("fake"), {"job": f"garbage {k}"})
        pipe.execute()
    settings = WorkerSettings(fake_engine=True, limit_model_concurrency=50, heartbeat_s=0.5)
    worker = Worker(settings, FakeEngine(), ar)
    running = asyncio.create_task(worker.run())
    try:
        # polled from a thread: this event loop runs the worker meanwhile
        await asyncio.to_thread(wait_for, lambda: r.xlen(c.job_stream("fake")) == 0, 60, "the stream to drain")
    finally:
        worker.stop()
        await running
    assert r.xlen(c.job_stream("fake")) == 0
    assert 300 <= r.xlen(c.DEAD_LETTER_STREAM) < 300 + NODE
    newest = json.loads(r.xrevrange(c.DEAD_LETTER_STREAM, count=1)[0][1]["letter"])
    assert newest["fields"] == {"job": "garbage 799"}  # the oldest letters went, not the newest


async def test_stale_worker_ids_are_pruned_and_health_keys_expire(ar: aioredis.Redis, r: redis.Redis) -> None:
    now_ms = int(time.time() * 1000)
    r.zadd(c.WORKERS_INDEX, {"long-gone": now_ms - 1000, "still-fresh": now_ms + 60_000})
    await health.record(ar, WorkerHealth(worker_id="me", model="fake", slots=1, running=0), c.HEALTH_TTL_S)
    assert set(r.zrange(c.WORKERS_INDEX, 0, -1)) == {"still-fresh", "me"}
    assert 29 <= r.ttl(c.WORKERS_INDEX) <= 31  # 3 x the 10 s health TTL + 1
    assert 9000 < r.pttl(c.worker_health_key("me")) <= 10_000
    assert [w.worker_id for w in await health.live_workers(ar)] == ["me"]  # no health key: not live
    await health.remove(ar, "me")
    assert r.zrange(c.WORKERS_INDEX, 0, -1) == ["still-fresh"] and not r.exists(c.worker_health_key("me"))


async def test_the_start_script_publishes_the_started_event_of_a_run_it_lets_run(
    ar: aioredis.Redis, r: redis.Redis
) -> None:
    """With ``announce`` the start script records and publishes the run's ``started`` event in its own step (one
    round trip less before the first token); the run's own publishes go on after it."""
    store = JobStore(ar)
    pubsub = r.pubsub()
    pubsub.ssubscribe(c.job_channel("ann"))
    assert pubsub.get_sharded_message(timeout=2)["type"] == "ssubscribe"
    first = await store.start("ann", "1-0", "t1", "w1", 0, announce=Announce("w1", 3))
    assert (first.run, first.started, first.seq, first.resumed) == (True, True, 0, False)
    live = pubsub.get_sharded_message(timeout=2)
    assert json.loads(live["data"]) == {"seq": 1, "type": "started", "worker": "w1", "resumed": False}
    assert await store.publish("ann", "t1", Delta(text="a"), 2) == 2
    taken_over = await store.start("ann", "1-0", "t2", "w2", 0, announce=Announce("w2", 3))
    assert (taken_over.started, taken_over.seq, taken_over.resumed) == (True, 2, True)
    assert await store.publish("ann", "t1", Delta(text="b"), 4) == FENCED
    recorded = [json.loads(fields["e"]) for _, fields in r.xrange(c.job_events_key("ann"))]
    assert [(e["seq"], e["type"], e.get("worker"), e.get("resumed")) for e in recorded] == [
        (1, "started", "w1", False),
        (2, "delta", None, None),
        (3, "started", "w2", True),
    ]
    assert 3590 < r.ttl(c.job_events_key("ann")) <= c.JOB_TTL_S
    pubsub.close()


async def test_the_start_script_announces_no_run_the_worker_refuses(ar: aioredis.Redis, r: redis.Redis) -> None:
    """Cancelled, past its deadline (not resumed), or past its attempts: the worker publishes the refusal as the
    job's first event, so the start script must publish nothing."""
    store = JobStore(ar)
    r.set(c.job_cancel_key("gone"), "1")
    cancelled = await store.start("gone", "1-0", "t", "w", 0, announce=Announce("w", 3))
    late = await store.start("late", "1-0", "t", "w", 0, announce=Announce("w", 3), deadline_ms=1)
    assert (await store.start("tired", "1-0", "a", "w", 0, announce=Announce("w", 1))).started
    tired = await store.start("tired", "1-0", "b", "w", 0, announce=Announce("w", 1))
    assert [(d.run, d.started) for d in (cancelled, late, tired)] == [(True, False)] * 3
    assert tired.attempts == 2 and tired.seq == 1
    assert [r.xlen(c.job_events_key(j)) for j in ("gone", "late", "tired")] == [0, 0, 1]
    assert r.hget(c.job_state_key("late"), "seq") is None


async def test_a_worker_whose_clock_is_an_hour_ahead_still_runs_jobs_within_their_deadline(
    ar: aioredis.Redis, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is judged by Redis' clock (lua/start.lua), not the worker host's: a worker whose clock is off
    refused every job as late. Here the whole process (worker and client) runs an hour ahead; the job's deadline
    comes from a gateway with the right time (a minute ahead of Redis)."""
    redis_now_ms = int(r.time()[0]) * 1000
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    worker = Worker(WorkerSettings(fake_engine=True, heartbeat_s=0.5), FakeEngine(), ar)
    running = asyncio.create_task(worker.run())
    client = AsyncClient(ar)
    try:
        timely = Job.model_validate(job("skewed", tokens=3, deadline_ms=redis_now_ms + 60_000))
        events = [e async for e in client.generate(timely)]
        assert (events[0].type, events[-1].type) == ("started", "done")
        assert events[-1].usage.completion_tokens == 3  # type: ignore[union-attr]
        late = Job.model_validate(job("late-by-redis", tokens=3, deadline_ms=redis_now_ms - 5_000))
        [refusal] = [e async for e in client.generate(late)]
        assert refusal.type == "failed" and refusal.error_code == ErrorCode.CONTROLLER_WORKER_TIMEOUT
        late_by = r"no worker started the job before its deadline \(5\.\ds late\); it was not run"
        assert re.fullmatch(late_by, refusal.message)  # type: ignore[union-attr]
    finally:
        worker.stop()
        await running
        await client.close()


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_new_job_streams_live_from_its_first_event_without_reading_the_replay_first(
    ar: aioredis.Redis, r: redis.Redis
) -> None:
    """A new id has no events before its submission: its stream starts live (no XRANGE before the first token),
    with its reader joined in the submission's round trip. A known id (here: finished) reads the replay first."""
    worker = Worker(WorkerSettings(fake_engine=True, heartbeat_s=0.5), FakeEngine(), ar)
    running = asyncio.create_task(worker.run())
    client = AsyncClient(ar)
    try:
        before, readers = _calls(r, "xrange"), []
        events = []
        async for event in client.generate(Job.model_validate(job("fresh", tokens=5))):
            readers.append(r.zcard(job_readers_key("fresh")))
            events.append(event)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert (events[0].type, events[-1].type, readers[0]) == ("started", "done", 1)
        assert _calls(r, "xrange") == before
        again = [e async for e in client.generate(Job.model_validate(job("fresh", tokens=5)))]
        assert again == events and _calls(r, "xrange") > before
    finally:
        worker.stop()
        await running
        await client.close()


async def test_events_published_before_a_live_stream_began_are_read_from_the_replay(
    ar: aioredis.Redis, r: redis.Redis
) -> None:
    """Without the replay read first, events that went by before the subscription was live show as a gap at the
    first live one, and the replay fills it: nothing is lost."""
    store, client = JobStore(ar), AsyncClient(ar)
    await store.start("gap", "1-0", "t", "w", 0, announce=Announce("w", 3))
    await store.publish("gap", "t", Delta(text="a"), 2)
    await store.publish("gap", "t", Done(finish_reason="stop", usage=Usage()), 3)
    inbox = Inbox()
    inbox.put_nowait(r.xrevrange(c.job_events_key("gap"), count=1)[0][1]["e"])  # only the last one arrived live
    events = [e async for e in client._events("gap", inbox, 0, replay_first=False)]
    assert [(e.seq, e.type) for e in events] == [(1, "started"), (2, "delta"), (3, "done")]
    await client.close()
