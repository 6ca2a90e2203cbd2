"""``make demo``: Redis (existing or our own), the demo model (unless MODEL_PATH), gateway, workers and the UI.

The demo model is the committed ``demo_model/`` checkpoint: a tiny InternVL trained on drawn pictures
(``make demo-model`` reproduces it), which answers questions about colors (README.md says which). ``DEMO_MODEL=random``
serves the random-weight tiny model instead (noise; what the mechanics tests use).

Environment: REDIS_URL, MODEL_PATH, MODEL_NAME, DEMO_MODEL, GATEWAY_PORT (8000), UI_PORT (8501), WORKERS (1),
DEVICE (cpu).
Ctrl-C or SIGTERM stops everything this script started, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STATE = ROOT / ".demo"
DEMO_MODEL = ROOT / "demo_model"
DEMO_NAME = "demo-internvl"
children: list[subprocess.Popen[bytes]] = []


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_redis(url: str) -> str:
    if redis_answers(url):
        log(f"using the Redis that answers at {url}")
        return url
    if shutil.which("redis-server") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log("redis-server is missing: installing it with apt-get")
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True)
        else:
            sys.exit(
                "[demo] no Redis at REDIS_URL and no redis-server: install it (sudo apt-get install "
                "redis-server, or brew install redis) or set REDIS_URL to a running Redis"
            )
    parts = urlsplit(url)
    port = parts.port or 6379
    STATE.mkdir(exist_ok=True)
    log(f"starting our own redis-server on 127.0.0.1:{port}")
    start(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(STATE),
        ],
        "redis",
    )
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if time.monotonic() > deadline:
            sys.exit(f"[demo] redis-server did not answer on port {port}")
        time.sleep(0.1)
    return url


def ensure_model() -> tuple[Path, str]:
    if path := os.environ.get("MODEL_PATH"):
        return Path(path), os.environ.get("MODEL_NAME") or Path(path).name
    if os.environ.get("DEMO_MODEL", "trained") != "random":
        return DEMO_MODEL, DEMO_NAME
    target = STATE / "tiny-internvl"
    if not (target / "config.json").exists():
        log("building the tiny random-weight InternVL checkpoint")
        from broker_worker.model.tiny_model import make_tiny_model

        make_tiny_model(target)
    return target, "tiny-internvl"


def start(cmd: list[str], name: str, env: dict[str, str] | None = None) -> None:
    STATE.mkdir(exist_ok=True)
    logfile = (STATE / f"{name}.log").open("ab")
    children.append(
        subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    )


def stop(*_: object) -> None:
    log("stopping everything the demo started")
    for child in reversed(children):
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    sys.exit(0)


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = ensure_redis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    model_path, model_name = ensure_model()
    gateway_port, ui_port = os.environ.get("GATEWAY_PORT", "8000"), os.environ.get("UI_PORT", "8501")
    workers = int(os.environ.get("WORKERS", "1"))
    for k in range(workers):
        start(
            [
                str(BIN / "broker-worker"),
                "run",
                "--redis-url",
                url,
                "--model-path",
                str(model_path),
                "--model-name",
                model_name,
                "--device",
                os.environ.get("DEVICE", "cpu"),
            ],
            f"worker{k + 1}",
        )
    start(
        [
            str(BIN / "broker-gateway"),
            "--redis-url",
            url,
            "--host",
            "0.0.0.0",
            "--port",
            gateway_port,
            "--worker-address",
            f"http://127.0.0.1:{gateway_port}",
        ],
        "gateway",
    )
    start(
        [
            str(BIN / "streamlit"),
            "run",
            str(ROOT / "ui" / "app.py"),
            "--server.port",
            ui_port,
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
        "ui",
        env={"GATEWAY_URL": f"http://127.0.0.1:{gateway_port}", "REDIS_URL": url},  # REDIS_URL: the Operations page
    )
    log(f"gateway  http://127.0.0.1:{gateway_port}  (POST /worker_generate_stream, /v1/chat/completions, /metrics)")
    log(f"chat UI  http://127.0.0.1:{ui_port}")
    log(f"redis    {url}   workers: {workers} x {model_name}   logs: {STATE}/*.log")
    if model_name == DEMO_NAME and "MODEL_PATH" not in os.environ:
        from broker_worker.model.demo_images import COLORS, QUESTIONS

        log(f"NOTE: {DEMO_NAME} is a tiny InternVL trained on drawn pictures, not a real model; it answers only")
        log(f"  {QUESTIONS['color']} / {QUESTIONS['quadrant']} / {QUESTIONS['shape']}  (colors: {', '.join(COLORS)})")
        log("  set MODEL_PATH for a real checkpoint")
    elif model_name == "tiny-internvl" and "MODEL_PATH" not in os.environ:
        log("NOTE: the tiny model has random weights: its answers are noise; set MODEL_PATH for a real one")
    log("Ctrl-C stops everything")
    while True:
        for child in children:
            if child.poll() is not None:
                log(f"a process exited ({child.args[0]}, code {child.returncode}); see {STATE}/*.log")
                stop()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
