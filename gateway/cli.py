"""``broker-gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from broker_worker import settings_cli
from broker_worker.protocol.connections import plain_url_problem
from broker_worker.protocol.redaction import redact
from gateway.deadlines import deadline_protocol
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway")


def main(argv: list[str] | None = None) -> int:
    from broker_worker.logs import configure
    from gateway.app import create_app

    parser = argparse.ArgumentParser(prog="broker-gateway", description="HTTP gateway in front of Redis workers")
    settings_cli.add_arguments(parser, GatewaySettings)
    settings = settings_cli.build(GatewaySettings, parser.parse_args(argv))
    configure(settings.log_level, settings.log_format)
    log.info(
        "gateway on %s:%d, redis %s, controller %s",
        settings.host,
        settings.port,
        redact(settings.redis_url),
        redact(settings.controller_address or "none"),
    )
    if problem := plain_url_problem(settings.redis_url):  # one clear line, not a lifespan traceback
        raise SystemExit(f"broker-gateway: {problem}")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,  # uvicorn's lines go through the root handler too, so its formatter redacts them
        timeout_graceful_shutdown=5,
        http=deadline_protocol(settings.header_timeout_s, settings.body_timeout_s),
    )
    # Everything built so far lives as long as the process: out of the collector's sight, a full collection
    # scans only what streams allocate (a full pass over the whole app took tens of ms, stalling every stream).
    gc.freeze()
    _Server(config, app).run()
    return 0


class _Server(uvicorn.Server):
    """Tells the service it is shutting down, so the streams cut by the shutdown do not cancel their jobs
    (clients resume them by id, from this gateway's successor)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service = getattr(self._app.state, "service", None)
        if service is not None:
            service.draining = True
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
