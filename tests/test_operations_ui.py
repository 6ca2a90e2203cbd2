"""The Streamlit app's Operations page in headless Chromium: a live worker, dead letters with their reason, a
letter made after the page loaded (no reload), and the Requeue button running a dead-lettered job to done."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from tests.admin_helpers import dead_letter_by_kill, letters, status_of
from tests.helpers import BIN, ROOT, Proc, RedisServer, free_port, job, live_worker_ids, spawn, wait_for
from tests.test_run import _ok, chromium

ARTIFACTS = ROOT / "tests" / "artifacts"


def start_ui(procs: list[Proc], tmp_path: Path, redis_url: str) -> str:
    port = free_port()
    args = [str(BIN / "streamlit"), "run", str(ROOT / "ui" / "app.py"), "--server.port", str(port)]
    args += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    env = {"REDIS_URL": redis_url, "GATEWAY_URL": f"http://127.0.0.1:{free_port()}", "OPS_REFRESH_S": "1"}
    procs.append(spawn("ui", args, tmp_path, env))
    wait_for(lambda: _ok(f"http://127.0.0.1:{port}/_stcore/health"), 60, "streamlit")
    return f"http://127.0.0.1:{port}"


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_operations_page(  # type: ignore[no-untyped-def]
    start_worker, procs: list[Proc], tmp_path: Path, redis_server: RedisServer, r: redis.Redis
) -> None:
    from playwright.sync_api import expect, sync_playwright

    dead_id, _ = dead_letter_by_kill(r, start_worker, job("ui-dead-1", model="ops", tokens=12))
    worker_id = next(w for w in live_worker_ids(r, "ops"))
    r.xadd("ivl:jobs:ops", {"job": "{broken json"})
    wait_for(lambda: len(letters(r)) == 2, 30, "the garbage letter")
    ui = start_ui(procs, tmp_path, redis_server.url)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(ui + "/", wait_until="domcontentloaded")
        page.get_by_role("link", name="Operations").click()
        page.wait_for_url("**/operations")
        expect(page.get_by_text(worker_id)).to_be_visible(timeout=60_000)
        expect(page.get_by_text("invalid job: : Invalid JSON").first).to_be_visible()
        expect(page.get_by_text("job failed on 1 deliveries (limit 1); dead-lettered").first).to_be_visible()

        r.xadd("ivl:jobs:ops", {"late": "made after the page loaded"})  # shows up without a reload
        expect(page.get_by_text("no 'job' field (fields: ['late'])").first).to_be_visible(timeout=30_000)

        button = page.locator(f".st-key-requeue-{dead_id}").get_by_role("button", name="Requeue")
        expect(button).to_be_enabled()
        page.screenshot(path=str(ARTIFACTS / "operations.png"), full_page=True)
        button.click()
        wait_for(lambda: status_of(r, "ui-dead-1") == "done", 40, "the requeued job to complete")
        expect(page.get_by_text("job ui-dead-1 requeued on ivl:jobs:ops")).to_be_visible(timeout=30_000)
        expect(page.locator(f".st-key-requeue-{dead_id}")).to_have_count(0, timeout=30_000)
        garbage = [i for i, letter in letters(r) if letter["job_id"] is None]
        assert len(garbage) == 2
        assert all(page.locator(f".st-key-requeue-{i} button").first.is_disabled() for i in garbage)
        page.screenshot(path=str(ARTIFACTS / "operations_requeued.png"), full_page=True)
        browser.close()
    assert [i for i, _ in letters(r)] == garbage
