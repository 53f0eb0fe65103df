"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): sign in, see a
node and an endpoint, submit a test job and see its output. Saves a screenshot."""

from __future__ import annotations

import re
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from runplane_testing.cluster import python_command

pytestmark = pytest.mark.system


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium here: ./scripts/browser-up installs Debian's (./scripts/test runs it)"
    return found


def test_dashboard_shows_the_fleet_and_runs_a_job(cluster, tmp_path):
    ep = cluster.create_endpoint(name="dash-echo", command=python_command("examples/echo/handler.py"))
    cluster.wait_workers(ep, 1)
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)  # a loaded machine: polls and the job take their time

            page.goto(cluster.gateway_url + "/")  # redirects to /dashboard
            assert page.url.endswith("/dashboard")
            page.fill("#api-key", "not-the-key")
            page.click("#login-form button[type=submit]")
            expect(page.locator("#login-error")).to_have_text("That key was refused.")
            problems.clear()  # the browser logs the refused request (401) as a console error

            page.fill("#api-key", cluster.api_key)
            page.click("#login-form button[type=submit]")
            expect(page.locator("#app")).to_be_visible()

            row = page.locator(f'#endpoints tr[data-endpoint="{ep}"]')
            expect(row).to_contain_text("dash-echo")
            node = page.locator('#nodes [data-node="node1"]')
            expect(node).to_contain_text("process")
            expect(node.locator(".state.up")).to_have_text("up")
            worker = node.locator("li[data-worker]")
            expect(worker.first).to_contain_text("dash-echo")

            page.select_option("#job-endpoint", ep)
            page.fill("#job-input", '{"text": "from the browser"}')
            page.click("#job-submit")
            expect(page.locator("#job-status")).to_have_text("COMPLETED")
            expect(page.locator("#job-output")).to_contain_text('"upper": "FROM THE BROWSER"')
            job_id = page.locator("#job-id").inner_text()
            assert job_id.endswith("-r1")
            # Where its time went: a bar per phase, the worker start named (the worker was up
            # before the job: running, or paused by flash boot while idle).
            phases = page.locator("#job-phases")
            expect(phases.locator('li[data-phase="workerStartMs"]')).to_contain_text(
                re.compile(r"worker start \((warm|flash)\)"))
            for phase in ("queuedMs", "waitingForCapacityMs", "handlerMs", "resultUploadMs", "totalMs"):
                expect(phases.locator(f'li[data-phase="{phase}"]')).to_contain_text(re.compile(r"\d+ ms|\d+\.\d s"))
            expect(page.locator("#job-queue")).to_be_hidden()  # not queued any more

            # The recent jobs of the selected endpoint, and the counts, follow by polling.
            page.select_option("#jobs-endpoint", ep)
            expect(page.locator(f'#jobs tr[data-job="{job_id}"]')).to_contain_text("COMPLETED")
            expect(row.locator("td").nth(9)).not_to_have_text("0")  # completed

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    assert problems == []
