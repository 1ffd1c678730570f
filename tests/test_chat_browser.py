"""The chat page in a real browser: headless Chromium, driven by selenium (a test-only dependency, in
setup.cfg's dev extra), loads the page from a server on 127.0.0.1, sends messages, sees each reply stream
in piece by piece, and stops one midway. Skipped where selenium, Chromium or chromedriver is missing;
Debian/Ubuntu: `apt-get install chromium chromium-driver` (README, "Chat")."""
import shutil
import time

import pytest

from test_chat_server import running, slowed
from test_chat_session import chatty_model

webdriver = pytest.importorskip("selenium.webdriver")
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="no Chromium and chromedriver (apt-get install chromium chromium-driver)")
# Without a network, Chromium would wait on its background connections: every one is switched off.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=900,700")


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.01)


def send(driver, text, stop_after=None):
    """Type `text`, send it, and watch the reply: every text it showed, until the page is idle again.
    stop_after: click Stop once the reply shows this many characters."""
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()
    wait_for(lambda: driver.find_element("tag name", "body").get_attribute("data-busy") == "true")
    seen = []
    while driver.find_element("tag name", "body").get_attribute("data-busy") == "true":
        replies = driver.find_elements("css selector", ".message.assistant")
        shown = replies[-1].text if replies else ""
        if shown and (not seen or shown != seen[-1]):
            seen.append(shown)
        if stop_after is not None and len(shown) >= stop_after:
            driver.find_element("id", "stop").click()
            stop_after = None
        time.sleep(0.005)
    return seen, driver.find_elements("css selector", ".message.assistant")[-1].text


def test_the_page_sends_messages_streams_the_replies_and_stops_one(browser, monkeypatch):
    model = chatty_model()
    with running(model) as server:
        slowed(model, monkeypatch, seconds=0.05)                     # so the page can be seen streaming
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        wait_for(lambda: "chat template" in browser.find_element("id", "model").text)

        seen, reply = send(browser, "Hi")
        assert reply == "Hello!"
        assert len(seen) > 2 and all(reply.startswith(text) for text in seen)   # it came piece by piece
        seen, reply = send(browser, "Again")
        assert reply == "Hi again."                                  # the page sent the conversation

        browser.find_element("id", "reset").click()
        assert browser.find_elements("css selector", ".message") == []
        slowed(model, monkeypatch, seconds=0.3)
        _, reply = send(browser, "Hi", stop_after=2)
        assert 2 <= len(reply) < len("Hello!") and "Hello!".startswith(reply)   # stopped, and kept
        with server.generating:
            assert server.last_reply[0] == "disconnected"           # the server stopped writing it
