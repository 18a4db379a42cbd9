"""Browser tests' harness: the standalone app (the same tab the WebUI shows) served on 127.0.0.1 and
driven in Debian's headless Chromium through Playwright. Requests to any other address are blocked
(and listed), and each test's screenshots land in test-artifacts/<test name>/."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from lora_trainer_ext.app import launch
from lora_trainer_ext.studio import Studio

CHROMIUM = os.environ.get("LORA_MAKER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LORA_MAKER_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
# As the machine notes advise: no sandbox (root), and none of Chromium's own network chatter.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
LOOPBACK = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/")  # a pattern, not an address


@pytest.fixture(scope="session")
def chromium():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run tools/setup.sh (it installs Debian's chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def create_project(page, name: str) -> None:
    """Create project `name` with the picker and wait until it is the picked one."""
    page.fill("#lora_maker_new_project textarea", name)
    page.click("#lora_maker_create_project")
    page.wait_for_function(f"() => document.querySelector('#lora_maker_project input').value === {name!r}")


def loopback_only(page, blocked: list) -> None:
    """Let `page` reach only the loopback; what else it asks for is refused and listed in `blocked`."""
    def route(r):
        if LOOPBACK.match(r.request.url) or r.request.url.startswith(("data:", "blob:")):
            return r.continue_()
        blocked.append(r.request.url)
        return r.abort()

    page.route("**/*", route)


class Page:
    """A browser page on the app, with screenshots numbered in the order they are taken."""

    def __init__(self, page, url: str, artifacts: Path):
        self.page, self.url, self.artifacts, self.shots, self.blocked = page, url, artifacts, 0, []

    def shot(self, name: str) -> Path:
        self.shots += 1
        path = self.artifacts / f"{self.shots:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def serve(studio: Studio):
    """Start the app for `studio` on a free loopback port; returns (demo, url)."""
    demo, _, url = launch(studio, block=False)
    return demo, url


@pytest.fixture
def open_ui(chromium, request):
    """`open_ui(studio)` serves the app and returns a `Page` on it; everything closes after the test."""
    demos, contexts = [], []
    artifacts = ARTIFACTS / re.sub(r"[^\w.-]", "_", request.node.name)
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)

    def open_(studio: Studio) -> Page:
        demo, url = serve(studio)
        demos.append(demo)
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        wrapped = Page(page, url, artifacts)

        loopback_only(page, wrapped.blocked)
        page.goto(url)
        page.wait_for_selector("#lora_maker_job_status")
        return wrapped

    yield open_
    for context in contexts:
        context.close()
    for demo in demos:
        demo.close()
