"""The web console in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``).

The page is served by the admin listener (``serve_admin``) of a real gateway in
front of a real echo backend; Selenium drives the system browser. When the browser cannot be started
the tests fail (``make test`` installs it as root), they never skip.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import wsgate
from wsgate.admin import AdminConfig, serve_admin
from wsgate.config import Listen, parse_config

from .helpers import wait_until

CHROMIUM = os.environ.get("WSGATE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("WSGATE_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = Path(tempfile.gettempdir()) / "wsgate-console.png"

TOKEN = "console-admin-token-0123456789"
KEY = "gold-key-0123456789-abcdef"

#: Seconds a browser-side condition may take.
WAIT = 10


class Browser:
    """One headless Chromium shared by the module's tests, started by the first test.

    Starting it inside a test (not in a fixture) makes a browser that cannot
    start a test *failure*, reported by every test that needs it.
    """

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="wsgate-chromium-")  # a fresh profile
        self.driver: WebDriver | None = None
        self.error: str | None = None

    def start(self) -> WebDriver:
        if self.driver is None and self.error is None:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in (
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1280,1000",
                f"--user-data-dir={self.profile}",
            ):
                options.add_argument(flag)
            try:
                self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
            except (WebDriverException, OSError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
        if self.driver is None:
            pytest.fail(
                f"cannot start headless Chromium ({CHROMIUM} driven by {CHROMEDRIVER}): "
                f"{self.error}\nInstall both as root: apt-get install -y chromium "
                "chromium-driver (make test does it)",
                pytrace=False,
            )
        return self.driver

    def close(self) -> None:
        if self.driver is not None:
            self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    shared = Browser()
    try:
        yield shared
    finally:
        shared.close()


@attrs.define
class Recorder:
    """A gateway observer keeping every handshake record."""

    handshakes: list[Mapping[str, Any]] = attrs.Factory(list)
    disconnects: list[Mapping[str, Any]] = attrs.Factory(list)

    def handshake(self, record: Mapping[str, Any]) -> None:
        self.handshakes.append(dict(record))

    def disconnect(self, pair: Any, record: Mapping[str, Any]) -> None:
        self.disconnects.append(dict(record))


def console_config(echo_url: str) -> wsgate.Config:
    """An open API and one whose product requires a subscription key."""
    return parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0"},
            "apis": [
                {"name": "echo", "display_name": "Echo service", "path": "echo",
                 "service_url": echo_url},
                {"name": "gold-echo", "display_name": "Gold echo", "path": "gold/echo",
                 "service_url": echo_url, "products": ["gold"]},
            ],
            "products": [{"id": "gold"}],
            "subscriptions": [{"id": "s1", "scope": "gold", "primary_key": KEY}],
        }
    )  # fmt: skip


@attrs.define
class Console:
    url: str  # the admin listener: http://127.0.0.1:PORT
    gateway: wsgate.Gateway
    recorder: Recorder

    @property
    def gateway_port(self) -> int:
        return self.gateway.addresses[0][1]


async def start_console(nursery: trio.Nursery, echo_url: str) -> Console:
    """A gateway (recording its handshakes) and its admin listener, which serves the console."""
    recorder = Recorder()
    gateway = wsgate.Gateway(console_config(echo_url), observers=[recorder])
    admin = AdminConfig(listen=Listen(host="127.0.0.1", port=0), token=TOKEN)
    host, port = await nursery.start(serve_admin, gateway, admin)
    await nursery.start(gateway.run)
    return Console(f"http://{host}:{port}", gateway, recorder)


# --- the page, as a user sees it ---------------------------------------------------------


class Page:
    """The console page in the browser: find, type, click, wait."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    def by_id(self, element_id: str) -> Any:
        return self.driver.find_element(By.ID, element_id)

    def type(self, element_id: str, text: str) -> None:
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(text)

    def click(self, element_id: str) -> None:
        self.by_id(element_id).click()

    def wait(self, what: str, condition: Callable[[], Any]) -> Any:
        try:
            return WebDriverWait(self.driver, WAIT).until(lambda _d: condition())
        except Exception as exc:
            raise AssertionError(
                f"timed out waiting for {what}; status: {self.status()!r}; output:\n"
                + "\n".join(self.output())
            ) from exc

    def status(self) -> str:
        text: str = self.by_id("status").text
        return text

    def state(self) -> str | None:
        state: str | None = self.by_id("status").get_attribute("data-state")
        return state

    def output(self) -> list[str]:
        return [item.text for item in self.driver.find_elements(By.CSS_SELECTOR, "#output li")]

    def wait_output(self, *parts: str) -> str:
        """The first Output entry containing every one of ``parts``."""

        def find() -> str | None:
            return next((line for line in self.output() if all(p in line for p in parts)), None)

        line: str = self.wait(f"an Output line with {parts}", find)
        return line

    def load(self, url: str, token: str = TOKEN) -> None:
        self.driver.get(f"{url}/console/")
        assert self.driver.title == "wsgate console"
        self.type("token", token)
        self.click("load")

    def pick(self, display_name: str) -> None:
        self.wait(
            "the API list",
            lambda: self.driver.find_elements(By.CSS_SELECTOR, "#api-rows input[type=radio]"),
        )
        # Pick by the row's accessible label, as a user would.
        label = self.driver.find_element(
            By.XPATH, f"//tbody[@id='api-rows']//label[normalize-space()='{display_name}']"
        )
        label.click()
        radio = self.by_id(label.get_attribute("for") or "")
        assert radio.is_selected()

    def labelled(self, label_text: str) -> Any:
        """The last input whose <label for> reads ``label_text``."""
        labels = self.driver.find_elements(By.XPATH, f"//label[normalize-space()='{label_text}']")
        return self.by_id(labels[-1].get_attribute("for") or "")


def _session(driver: WebDriver, url: str, gateway_port: int) -> None:
    page = Page(driver)
    driver.delete_all_cookies()
    page.load(url)
    page.pick("Echo service")
    status = page.by_id("auth-status").text
    assert "2 APIs loaded" in status, status
    assert page.by_id("gateway-url").get_attribute("value") == f"ws://127.0.0.1:{gateway_port}"

    page.click("add-param")
    page.labelled("Name").send_keys("greeting")
    page.labelled("Value").send_keys("hi there")
    request_url = f"ws://127.0.0.1:{gateway_port}/echo?greeting=hi+there"
    assert page.by_id("request-url").text == request_url

    page.click("connect")
    page.wait("Connected", lambda: page.state() == "connected")
    assert page.status() == "Connected (subprotocol: (none))"
    page.wait_output("info", f"Connecting to {request_url}")

    page.type("payload", "hello gateway")
    page.click("send")
    page.wait_output("sent", "text", "hello gateway")
    page.wait_output("received", "text", "hello gateway")

    page.click("format-hex")
    page.type("payload", "0a 0b 0c")
    page.click("send")
    page.wait_output("received", "binary", "3 bytes: 0a0b0c")
    # Output entries carry a HH:MM:SS.mmm timestamp.
    stamp = page.driver.find_element(By.CSS_SELECTOR, "#output li time").text
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", stamp), stamp
    assert page.by_id("output").get_attribute("aria-live") == "polite"
    driver.save_screenshot(str(SCREENSHOT))

    page.click("disconnect")
    page.wait("Disconnected", lambda: page.state() == "disconnected")
    assert page.status() == "Disconnected (close code 1000)"
    assert page.by_id("connect").is_enabled()
    assert not page.by_id("send").is_enabled()


async def test_session_echo(nursery: trio.Nursery, echo_url: str, browser: Browser) -> None:
    """Load the APIs, pick one, add a query parameter, connect, send, see the echo, disconnect."""
    driver = await trio.to_thread.run_sync(browser.start)
    console = await start_console(nursery, echo_url)
    await trio.to_thread.run_sync(_session, driver, console.url, console.gateway_port)
    accepted = [r for r in console.recorder.handshakes if r["response_code"] == 101]
    assert [r["url"] for r in accepted] == ["/echo?greeting=hi+there"]
    with trio.fail_after(5):  # the browser's close handshake has reached the gateway
        await wait_until(lambda: len(console.recorder.disconnects) == 1)
    record = console.recorder.disconnects[0]
    assert (record["close_code"], record["closed_by"]) == (1000, "client"), record
    assert SCREENSHOT.stat().st_size > 0


def _refused(driver: WebDriver, url: str, gateway_port: int) -> None:
    page = Page(driver)
    page.load(url, token="not-the-token")
    page.wait("the token refusal", lambda: "Cannot load the APIs" in page.by_id("auth-status").text)
    assert "HTTP 401: invalid token. Check the admin token." in page.by_id("auth-status").text

    page.type("token", TOKEN)
    page.click("load")
    page.pick("Gold echo")
    # The API needs a subscription: the page adds its key parameter, empty.
    name = page.driver.find_element(By.CSS_SELECTOR, "#params .param-name")
    assert name.get_attribute("value") == "subscription-key"

    page.click("connect")
    page.wait("the refusal", lambda: page.state() == "refused")
    assert page.status() == "Handshake refused: HTTP 401 Unauthorized"
    page.wait_output("error", "close code 1006")
    line = page.wait_output("error", "Refused by the gateway: HTTP 401 Unauthorized")
    assert "missing subscription key" in line, line
    assert page.by_id("connect").is_enabled()

    # With the subscription key in the query, the same API connects.
    page.labelled("Value").send_keys(KEY)
    assert page.by_id("request-url").text == (
        f"ws://127.0.0.1:{gateway_port}/gold/echo?subscription-key={KEY}"
    )
    page.click("connect")
    page.wait("Connected", lambda: page.state() == "connected")
    page.type("payload", "gold message")
    page.click("send")
    page.wait_output("received", "text", "gold message")
    page.click("disconnect")
    page.wait("Disconnected", lambda: page.state() == "disconnected")


async def test_refused_handshake_shows_status(
    nursery: trio.Nursery, echo_url: str, browser: Browser
) -> None:
    """A handshake refused by a policy: close code 1006, then the status the probe reads."""
    driver = await trio.to_thread.run_sync(browser.start)
    console = await start_console(nursery, echo_url)
    await trio.to_thread.run_sync(_refused, driver, console.url, console.gateway_port)
    codes = [r["response_code"] for r in console.recorder.handshakes]
    # The browser's refused handshake, the admin listener's probe, the keyed one.
    assert codes == [401, 401, 101], codes
