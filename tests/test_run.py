"""What a newcomer meets: docker-compose.yml, `make demo`, and the chat UI in a real (headless) browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from PIL import Image

from broker_worker.model.demo_images import COLORS, png_base64
from tests.helpers import BIN, ROOT, Proc, free_port, png_b64, spawn, wait_for

ARTIFACTS = ROOT / "tests" / "artifacts"


def test_compose_structure() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "gateway", "worker", "ui"} <= set(services)
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "broker-worker check" in " ".join(worker["healthcheck"]["test"])
    assert "healthcheck" in services["gateway"] and "healthcheck" in services["redis"]
    assert "container_name" not in worker and "ports" not in worker  # required for --scale worker=N
    assert any(v.endswith(":/models:ro") for v in worker["volumes"])
    assert "appendonly" in services["redis"]["command"]
    text = (ROOT / "docker-compose.yml").read_text()
    secrets = re.findall(r"\$\{(\w*(?:PASSWORD|TOKEN)\w*)(?::-([^}]*))?\}", text)
    assert {name for name, _ in secrets} == {"REDIS_PASSWORD", "GATEWAY_API_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
    assert {default for _, default in secrets} == {""}  # secrets only via env, with no default value
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "TOKEN" in key:
                assert str(value).startswith("${"), (key, value)
    assert (ROOT / worker["build"]["dockerfile"]).exists()
    assert "torch" not in (ROOT / services["gateway"]["build"]["dockerfile"]).read_text().lower().replace(
        "no torch", ""
    )


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="no docker compose client here",
)
def test_docker_compose_config() -> None:
    subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, check=True, timeout=60)


def own_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


@pytest.mark.slow
def test_make_demo_starts_everything_and_stops_clean(tmp_path: Path) -> None:
    gateway_port, ui_port, redis_port = free_port(), free_port(), free_port()
    env = {"GATEWAY_PORT": str(gateway_port), "UI_PORT": str(ui_port), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    demo = spawn("demo", [str(BIN / "python"), "scripts/demo.py"], tmp_path, env)
    try:
        base = f"http://127.0.0.1:{gateway_port}"

        def serving() -> bool:
            try:
                return bool(httpx.post(base + "/worker_get_status", timeout=2).json()["model_names"])
            except (httpx.HTTPError, KeyError, ValueError):
                assert demo.alive, demo.log()
                return False

        wait_for(serving, 120, "the demo gateway to list a model")
        wait_for(lambda: _ok(f"http://127.0.0.1:{ui_port}/_stcore/health"), 60, "the demo UI")
        red = png_base64(Image.new("RGB", (900, 500), COLORS["red"]))
        payload = {
            "model": "demo-internvl",  # the committed demo model, which sees
            "prompt": [{"role": "user", "content": "What color is the image?", "image": [red]}],
            "max_new_tokens": 16,
            "temperature": 0,
        }
        body = httpx.post(base + "/worker_generate_stream", json=payload, timeout=60).content
        assert body.endswith(b"\0")
        last = json.loads(body.split(b"\0")[-2])
        assert last["error_code"] == 0 and last["finish_reason"] == "stop"
        assert last["text"].strip() == "red"
        assert "demo-internvl is a tiny InternVL trained on drawn pictures" in demo.log()
        assert redis.Redis(port=redis_port).ping()  # the demo started its own Redis on REDIS_URL's port
    finally:
        demo.popen.send_signal(signal.SIGTERM)
        demo.popen.wait(30)
    assert demo.popen.returncode == 0
    wait_for(
        lambda: (
            not own_processes(f"--port {gateway_port}")
            and not own_processes(f"--port {redis_port}")
            and not own_processes(f"server.port {ui_port}")
        ),
        20,
        "every demo process to exit",
    )


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_ui(procs: list[Proc], tmp_path: Path, gateway: str) -> int:
    """The Streamlit chat app against ``gateway``, on a free port, answering its health check."""
    port = free_port()
    args = [
        str(BIN / "streamlit"),
        "run",
        str(ROOT / "ui" / "app.py"),
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    procs.append(spawn("ui", args, tmp_path, {"GATEWAY_URL": gateway}))
    wait_for(lambda: _ok(f"http://127.0.0.1:{port}/_stcore/health"), 60, "streamlit")
    return port


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_chat_ui_in_headless_chromium(
    tiny_model: Path,
    start_worker,
    start_gateway,
    procs: list[Proc],  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    start_worker(model="tiny-internvl", model_path=tiny_model)
    _, gateway = start_gateway()
    ui_port = start_ui(procs, tmp_path, gateway)
    image = tmp_path / "cat.png"
    import base64

    image.write_bytes(base64.b64decode(png_b64(400, 300)))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{ui_port}/", wait_until="domcontentloaded")
        page.get_by_text("tiny random-weight test model").wait_for(timeout=60_000)
        page.locator('input[type="file"]').set_input_files(str(image))
        page.get_by_text("cat.png").wait_for(timeout=30_000)
        chat = page.locator('[data-testid="stChatInputTextArea"]')
        chat.fill("What is in this picture?")
        chat.press("Enter")
        messages = page.locator('[data-testid="stChatMessage"]')
        wait_for(lambda: messages.count() >= 2, 60, "the user and assistant messages")
        answer = messages.nth(1).locator('[data-testid="stMarkdown"]')
        # Text appears (that it grows token by token is checked with the fake model's steady stream in
        # test_stop_button_cancels_the_job: the noise model may end its answer in one render).
        wait_for(lambda: answer.count() and answer.all_inner_texts()[0], 60, "the answer's text", step=0.02)
        page.screenshot(path=str(ARTIFACTS / "chat_ui_streaming.png"), full_page=True)
        wait_for(
            lambda: (
                page.locator('[data-testid="stChatMessage"]').count() >= 2 and "Stop generating" not in page.content()
            ),
            60,
            "the answer to finish",
        )
        page.screenshot(path=str(ARTIFACTS / "chat_ui.png"), full_page=True)
        text = page.locator('[data-testid="stChatMessage"]').nth(1).inner_text()
        user_images = messages.nth(0).locator("img").count()
        browser.close()
    assert "error_code" not in text
    assert user_images == 1  # the uploaded picture is shown in the user's turn


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_stop_button_cancels_the_job(  # type: ignore[no-untyped-def]
    start_worker, start_gateway, procs: list[Proc], tmp_path: Path, r: redis.Redis
) -> None:
    from playwright.sync_api import sync_playwright

    start_worker(model="tiny-fake", delay=0.05)  # a slow fake model: 20 tokens/s
    _, gateway = start_gateway()
    ui_port = start_ui(procs, tmp_path, gateway)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{ui_port}/", wait_until="domcontentloaded")
        chat = page.locator('[data-testid="stChatInputTextArea"]')
        chat.wait_for(timeout=60_000)
        wait_for(lambda: chat.is_enabled(), 30, "a model in the list")
        chat.fill("Tell me a long story")
        chat.press("Enter")
        answer = page.locator('[data-testid="stChatMessage"]').nth(1).locator('[data-testid="stMarkdown"]')
        lengths: list[int] = []

        def grown() -> bool:
            lengths.append(len(answer.all_inner_texts()[0]) if answer.count() else 0)
            return len({n for n in lengths if n}) >= 3 and lengths[-1] > 20  # seen growing: it streams

        wait_for(grown, 60, "streamed text to appear and grow", step=0.02)
        page.get_by_role("button", name="Stop generating").click()
        page.get_by_text("(stopped)").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "chat_ui_stopped.png"), full_page=True)
        browser.close()
    states = [r.hget(key, "status") for key in r.scan_iter("ivl:job:*:state")]
    assert states == ["cancelled"]
