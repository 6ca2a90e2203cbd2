from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import Proc, RedisServer, live_worker_ids, spawn, spawn_gateway, wait_for, worker_args


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def redis_server(tmp_session: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_session).start()
    yield server
    server.kill()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_session: Path) -> Path:
    from broker_worker.model.tiny_model import make_tiny_model

    return make_tiny_model(tmp_session / "tiny-internvl")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop(timeout=10)


@pytest.fixture
def start_worker(procs: list[Proc], tmp_path: Path, redis_server: RedisServer, r: redis.Redis):  # type: ignore[no-untyped-def]
    def start(model: str = "fake", wait: bool = True, url: str | None = None, **kwargs: object) -> Proc:
        proc = spawn(f"worker-{model}", worker_args(url or redis_server.url, model=model, **kwargs), tmp_path)
        procs.append(proc)
        if wait:
            before = len(live_worker_ids(redis_server.client(), model))
            wait_for(
                lambda: len(live_worker_ids(redis_server.client(), model)) > before or not proc.alive,
                60,
                f"worker for {model} to report healthy",
            )
            assert proc.alive, proc.log()
        return proc

    return start


@pytest.fixture
def start_gateway(procs: list[Proc], tmp_path: Path, redis_server: RedisServer):  # type: ignore[no-untyped-def]
    def start(*extra: str, url: str | None = None, port: int | None = None) -> tuple[Proc, str]:
        proc, base = spawn_gateway(url or redis_server.url, tmp_path, *extra, port=port)
        procs.append(proc)
        return proc, base

    return start
