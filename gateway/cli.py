"""``broker-gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from broker_worker import settings_cli
from broker_worker.connections import redact
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway")


def main(argv: list[str] | None = None) -> int:
    from broker_worker.logs import configure
    from gateway.app import create_app

    parser = argparse.ArgumentParser(prog="broker-gateway", description="HTTP gateway in front of Redis workers")
    settings_cli.add_arguments(parser, GatewaySettings)
    settings = settings_cli.build(GatewaySettings, parser.parse_args(argv))
    configure(settings.log_level)
    log.info(
        "gateway on %s:%d, redis %s, controller %s",
        settings.host,
        settings.port,
        redact(settings.redis_url),
        settings.controller_address or "none",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
