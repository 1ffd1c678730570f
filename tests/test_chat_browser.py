"""The chat page in a real browser: headless Chromium, driven by selenium (a test-only dependency, in
setup.cfg's dev extra), loads the page from a server on 127.0.0.1, sends messages, sees each reply stream
in piece by piece, and stops one midway. Skipped where selenium, Chromium or chromedriver is missing;
Debian/Ubuntu: `apt-get install chromium chromium-driver` (README, "Chat")."""
import importlib.util
import time
from pathlib import Path

import pytest

from test_chat_server import running, slowed
from test_chat_session import chatty_model

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("chat_screenshot", REPO_ROOT / "benchmarks/chat_screenshot.py")
screenshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshot)

pytest.importorskip("selenium.webdriver")
pytestmark = pytest.mark.skipif(None in screenshot.find_browser(), reason="no Chromium and chromedriver "
                                "(apt-get install chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    driver = screenshot.start_chromium(tmp_path / "profile")   # headless, every background connection off
    try:
        yield driver
    finally:
        driver.quit()


def send(driver, text, stop_after=None):
    """Type `text`, send it, and watch the reply: every text it showed, until the page is idle again.
    stop_after: click Stop once the reply shows this many characters."""
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()
    screenshot.wait_for(lambda: driver.find_element("tag name", "body").get_attribute("data-busy") == "true")
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
        screenshot.wait_for(lambda: "chat template" in browser.find_element("id", "model").text)

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
