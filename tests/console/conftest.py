"""Fixtures for driving the admin console in a real headless Chromium.

The gateway, the fake upstream and the seeded usage history are set up by
the Rust test `console_browser::the_console_works_in_a_real_browser`, which
passes the addresses and the admin token in the environment. The browser is
Debian's chromium (Playwright's own browser download is not used).
"""

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through scripts/test")
    return value


@pytest.fixture(scope="session")
def console_url() -> str:
    return _env("CONSOLE_URL")


@pytest.fixture(scope="session")
def base_url() -> str:
    """The gateway's OpenAI-compatible root, for the SDK."""
    return _env("TOLLGATE_BASE_URL")


@pytest.fixture(scope="session")
def admin_token() -> str:
    return _env("CONSOLE_ADMIN_TOKEN")


@pytest.fixture(scope="session")
def shots() -> Path | None:
    """Where page screenshots go (docs/console when regenerating them)."""
    target = os.environ.get("CONSOLE_SCREENSHOTS")
    if not target:
        return None
    path = Path(target)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser():
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, console_url):
    context = browser.new_context(
        base_url=console_url,
        viewport={"width": 1280, "height": 860},
        permissions=["clipboard-read", "clipboard-write"],
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Answers refused on purpose (401, 403, 400) are the tests' own business
    # and asserted there; a script error or other console error fails.
    page.on(
        "console",
        lambda m: errors.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text else None,
    )
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"
