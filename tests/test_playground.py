"""The playground page (GET /) in headless Chromium against a real `codellm serve` on the tiny model.

A person's path through the page: type a prompt and run it (the text must arrive in pieces, i.e. streamed,
not as one final blob), fill a gap at the editor's cursor and insert the middle, chat once with the
keyboard, stop a long generation, and see the server's error message and then succeed with an API key.
Screenshots go to the test's tmp_path and, when $CODELLM_TEST_ARTIFACTS is set, there too.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skips, saying so, without them.
Selenium is pointed at /usr/bin/chromedriver explicitly, so Selenium Manager never downloads a driver.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs headless Chromium and its driver: apt-get install chromium chromium-driver",
    ),
]

FINISHED = ("done", "stopped", "error")

# Records [task, text length] at every change of an element. `task` counts the browser tasks (event-loop
# turns) in which changes happened: text that arrives as one blob is appended within a single task, however
# many events it holds, while a streamed response reaches the page in several network reads.
TRACE_JS = """
const el = document.getElementById(arguments[0]);
window.__trace = [];
let task = 0, fresh = true;
new MutationObserver(() => {
  if (fresh) { task++; fresh = false; setTimeout(() => { fresh = true; }, 0); }
  window.__trace.push([task, el.textContent.length]);
}).observe(el, {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from tests.server_fixtures import shared_server

    return shared_server(tiny_model_dir)  # one process for the session, shared with the other server tests


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def shot(browser, tmp_path):
    """shot(name): a PNG of the page in tmp_path, and in $CODELLM_TEST_ARTIFACTS when that is set."""
    dirs = [tmp_path] + (
        [Path(os.environ["CODELLM_TEST_ARTIFACTS"])] if os.environ.get("CODELLM_TEST_ARTIFACTS") else []
    )

    def take(name: str) -> Path:
        png = browser.get_screenshot_as_png()
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"playground-{name}.png").write_bytes(png)
        return tmp_path / f"playground-{name}.png"

    return take


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def set_value(driver, element_id, text):
    """Type `text` into a field as a person would (select all, then type over it)."""
    from selenium.webdriver.common.keys import Keys

    el = by_id(driver, element_id)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(text)


def wait_finished(driver, timeout=120) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: by_id(d, "status").get_attribute("data-state") in FINISHED
    )
    return by_id(driver, "status").get_attribute("data-state")


def open_page(driver, url):
    """The page, set for 48 new tokens that do not end early (the tiny random model meets EOS soon otherwise)."""
    from tests.server_fixtures import SLOW

    driver.get(url + "/")
    assert driver.title == "codellm playground"
    set_value(driver, "max-tokens", "48")
    set_value(driver, "repetition-penalty", str(SLOW["repetition_penalty"]))


def test_completion_streams(server, browser, shot):
    open_page(browser, server.url)
    set_value(browser, "prompt", "def fibonacci(n):\n")
    browser.execute_script(TRACE_JS, "output")
    by_id(browser, "run").click()
    state = wait_finished(browser)
    shot("completion")
    assert state == "done", by_id(browser, "error").text
    text = by_id(browser, "output").text
    assert text, "no text came back"
    # streamed: the text grew in more than one browser task, i.e. it arrived in pieces
    trace = browser.execute_script("return window.__trace")
    tasks = {task for task, n in trace if n > 0}
    assert len(tasks) >= 2, f"the output appeared all at once (one task), not streamed: {trace}"
    status = by_id(browser, "status").text
    assert "TTFT" in status and "tok/s" in status, status


def test_completion_openai_route(server, browser):
    open_page(browser, server.url)
    by_id(browser, "api-openai").click()
    set_value(browser, "prompt", "import os\n")
    by_id(browser, "run").click()
    assert wait_finished(browser) == "done", by_id(browser, "error").text
    assert by_id(browser, "output").text


def test_infill_at_cursor(server, browser, shot):
    open_page(browser, server.url)
    by_id(browser, "mode-infill").click()
    assert by_id(browser, "panel-infill").is_displayed() and not by_id(browser, "panel-completion").is_displayed()
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    set_value(browser, "editor", prefix + suffix)
    browser.execute_script(
        "arguments[0].setSelectionRange(arguments[1], arguments[1])", by_id(browser, "editor"), len(prefix)
    )
    by_id(browser, "order-spm").click()
    by_id(browser, "run").click()
    state = wait_finished(browser)
    shot("infill")
    assert state == "done", by_id(browser, "error").text
    # the result shows the file with the middle at the cursor, highlighted
    assert by_id(browser, "infill-prefix").get_attribute("textContent") == prefix
    assert by_id(browser, "infill-suffix").get_attribute("textContent") == suffix
    middle = by_id(browser, "infill-middle")
    assert middle.tag_name == "mark" and middle.text, "no highlighted middle"
    by_id(browser, "infill-accept").click()  # inserts it into the editor at the cursor
    editor = by_id(browser, "editor")
    assert editor.get_attribute("value") == prefix + middle.get_attribute("textContent") + suffix


def test_chat_with_the_keyboard(server, browser, shot):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server.url)
    tab = by_id(browser, "mode-completion")
    tab.click()
    tab.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # tabs follow the arrow keys
    assert by_id(browser, "mode-chat").get_attribute("aria-selected") == "true"
    set_value(browser, "chat-input", "Write a function that adds two numbers.")
    by_id(browser, "chat-input").send_keys(Keys.ENTER)  # Enter sends
    state = wait_finished(browser)
    shot("chat")
    assert state == "done", by_id(browser, "error").text
    from selenium.webdriver.common.by import By

    messages = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")
    assert [m.get_attribute("class") for m in messages] == ["msg user", "msg assistant"]
    assert "adds two numbers" in messages[0].text
    assert by_id(browser, "chat-input").get_attribute("value") == ""


def test_stop_button(server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server.url)
    set_value(browser, "max-tokens", "200")
    set_value(browser, "prompt", "x")
    by_id(browser, "run").click()
    WebDriverWait(browser, 60, poll_frequency=0.02).until(
        lambda d: by_id(d, "output").text or by_id(d, "status").get_attribute("data-state") in FINISHED
    )
    by_id(browser, "stop").click()
    assert wait_finished(browser) in ("stopped", "done")  # a fast server may have finished already
    assert by_id(browser, "run").is_enabled() and not by_id(browser, "stop").is_enabled()


def test_api_key_and_error_message(tiny_model_dir, browser, shot):
    from tests.server_fixtures import start_server

    srv = start_server(tiny_model_dir, "--api-key", "s3cret")
    try:
        open_page(browser, srv.url)
        by_id(browser, "run").click()
        assert wait_finished(browser) == "error"
        error = by_id(browser, "error")
        shot("error")
        assert error.is_displayed() and "401" in error.text, error.text
        set_value(browser, "api-key", "s3cret")
        by_id(browser, "run").click()
        assert wait_finished(browser) == "done", by_id(browser, "error").text
        assert not by_id(browser, "error").is_displayed()
        browser.refresh()  # the key is remembered by this browser
        assert by_id(browser, "api-key").get_attribute("value") == "s3cret"
    finally:
        srv.stop()
