"""A screenshot of the chat page, taken by headless Chromium (docs/chat-page.png in README and docs/chat.md).

    python benchmarks/chat_screenshot.py runs/default docs/chat-page.png --message "Reverse\\nqxbf" \\
        --message "Sort\\ndcba" --message "Uppercase\\nhello"

It starts `python generate.py RUN_DIR --serve --port 0` (any free port), opens the page in headless
Chromium (driven by selenium: `pip install -e .[dev]`; the browser: `apt-get install chromium
chromium-driver`), sends each message ("\\n" in it: a new line, typed as Shift+Enter), waits for its
reply, and saves the page as a PNG. The browser test (tests/test_chat_browser.py) starts Chromium the
same way (start_chromium).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Without a network Chromium would wait on its background connections: every one is switched off.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--hide-scrollbars")


def find_browser():
    """(Chromium, chromedriver) paths, or None for a missing one."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    return browser, shutil.which("chromedriver")


def start_chromium(profile_dir, width=900, height=700):
    """A selenium driver of a headless Chromium with a fresh profile in `profile_dir`."""
    from selenium import webdriver
    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there in time")
        time.sleep(0.01)


def type_message(driver, text):
    """Type `text` into the page's text box, each new line as Shift+Enter (Enter alone sends)."""
    from selenium.webdriver import ActionChains, Keys
    box = driver.find_element("id", "input")
    for i, line in enumerate(text.split("\n")):
        if i:
            ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        box.send_keys(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder or model file, as generate.py takes it")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--message", action="append", default=[], help="a message to send (repeatable)")
    parser.add_argument("--width", type=int, default=900, help="the window's width (default: %(default)s)")
    parser.add_argument("--height", type=int, default=640, help="the window's height (default: %(default)s)")
    args = parser.parse_args(argv)
    if None in find_browser():
        sys.exit("error: Chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    command = [sys.executable, str(REPO_ROOT / "generate.py"), args.run, "--serve", "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        first = server.stderr.readline()
        if "http://" not in first:
            sys.exit(f"error: the server did not start: {first.strip()} {server.stderr.read().strip()}")
        url = "http://" + first.split("http://")[1].split()[0]
        with tempfile.TemporaryDirectory() as profile:
            driver = start_chromium(profile, args.width, args.height)
            try:
                frame = driver.execute_script("return window.outerHeight - window.innerHeight")
                driver.set_window_size(args.width, args.height + frame)      # the page gets the height asked
                driver.get(url)
                wait_for(lambda: "template" in driver.find_element("id", "model").text)
                for message in args.message:
                    type_message(driver, message.replace("\\n", "\n"))
                    driver.find_element("id", "send").click()
                    wait_for(lambda: driver.find_elements("css selector", ".message.assistant"))
                    wait_for(lambda: driver.find_element("tag name", "body").get_attribute("data-busy")
                             == "false")
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    finally:
        server.terminate()
        server.wait()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
