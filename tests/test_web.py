"""The chat page of `jaxsink serve` in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, which .ci/run installs), driven by Selenium, against a tiny model served by
a real server process that needs an API key: a conversation streamed in one session over two
turns, a reply stopped (its row freed), text that looks like HTML shown as text, errors shown
in the page, and the key asked for once.

Why Selenium: it drives the distribution's own Chromium through the distribution's own
chromedriver (no browser download, as Playwright would need), given explicitly so Selenium
Manager never goes to the network.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.chromium import CHROMIUM, headless_chromium
from tests.support.served import Server, metric_values
from tests.support.tiny import chat_checkpoint

KEY = "sk-page-3b1d"
AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = chat_checkpoint(tmp_path_factory.mktemp("web_model"))
    home = tmp_path_factory.mktemp("web_home")
    s = Server(model, home, "--max-batch", "2", "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = headless_chromium(tmp_path_factory.mktemp("chromium_profile"))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


@pytest.fixture
def page(browser, server):
    """The chat page freshly opened (a new conversation), with the server's key stored as the
    page stores it."""
    browser.get(server.url + "/")
    browser.execute_script("localStorage.setItem('jaxsink.apiKey', arguments[0])", KEY)
    browser.get(server.url + "/")
    wait_for(browser, lambda d: by_id(d, "model").text == "ckpt")
    return browser


def set_field(driver, name: str, value) -> None:
    field = by_id(driver, name)
    field.clear()
    field.send_keys(str(value))


def say(driver, text: str) -> None:
    """Type `text` into the message box (newlines as Shift+Enter) and press Enter."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    box = by_id(driver, "message")
    box.click()
    for i, line in enumerate(text.split("\n")):
        if i:
            ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(
                Keys.SHIFT
            ).perform()
        box.send_keys(line)
    assert box.get_attribute("value") == text  # Shift+Enter made a new line, sent nothing
    box.send_keys(Keys.ENTER)


def replies(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant .text')].map(e => e.textContent)"
    )


def wait_for_reply(driver, count: int, timeout: float = 60) -> str:
    """The text of the page's `count`-th reply, once it has finished streaming."""

    def done(d):
        bubbles = d.execute_script("return document.querySelectorAll('.msg.assistant').length")
        streaming = d.execute_script("return document.querySelector('.streaming') !== null")
        return bubbles == count and not streaming and by_id(d, "send").is_enabled()

    wait_for(driver, done, timeout)
    return replies(driver)[-1]


def number(text: str) -> int:
    return int(text.replace(",", ""))


def metrics(server: Server) -> dict:
    return metric_values(httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text)


def test_a_conversation_streams_in_one_session(page, server):
    """Two turns typed into the page: each reply streams in pieces and equals the server's
    reply to the same request; the second turn continues the same session's stream, feeding
    only its new message; tokens seen and cache slots are the server's session's."""
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", 12)
    set_field(page, "system", "t60 t61")
    session = by_id(page, "session").text
    assert session.startswith("web-")

    say(page, "t5 t6\nt7")
    first = wait_for_reply(page, 1)
    messages = [
        {"role": "system", "content": "t60 t61"},
        {"role": "user", "content": "t5 t6\nt7"},
    ]
    body = {"messages": messages, "temperature": 0, "max_tokens": 12}
    alone = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert first and first == alone.json()["choices"][0]["message"]["content"]
    # each streamed piece entered the page as its own text node
    pieces = page.execute_script(
        "return document.querySelector('.msg.assistant .text').childNodes.length"
    )
    assert pieces > 1
    info = httpx.get(f"{server.url}/v1/sessions/{session}", headers=AUTH, timeout=10).json()
    wait_for(page, lambda d: number(by_id(d, "tokens-seen").text) == info["tokens"])
    assert by_id(page, "cache-slots").text == f"{info['cache_slots']} of {info['cache_size']}"
    assert info["tokens"] > info["cache_size"]  # the stream has gone past the cache already
    assert by_id(page, "ttft").text.endswith(" s")
    assert "tokens" in by_id(page, "tok-per-s").text
    assert not by_id(page, "system").is_enabled()  # it started this conversation

    before = metrics(server)
    say(page, "t8")
    second = wait_for_reply(page, 2)
    after = metrics(server)
    assert second
    fed = after[("jaxsink_prompt_tokens_total", ())] - before[("jaxsink_prompt_tokens_total", ())]
    assert 0 < fed <= 6  # the new message in its template, not the conversation again
    later = httpx.get(f"{server.url}/v1/sessions/{session}", headers=AUTH, timeout=10).json()
    assert later["tokens"] > info["tokens"] and later["cache_slots"] == later["cache_size"]
    wait_for(page, lambda d: number(by_id(d, "tokens-seen").text) == later["tokens"])
    assert by_id(page, "error").get_attribute("hidden") is not None

    by_id(page, "new-conversation").click()
    assert by_id(page, "session").text != session and replies(page) == []
    assert by_id(page, "system").is_enabled()


def health(server: Server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def test_stopping_a_reply_frees_its_row(page, server):
    """The stop button ends the fetch mid-reply: the server frees the row (/health), the
    session keeps its stream, and the next turn of the same session is answered."""
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", 4000)
    say(page, "t7")  # greedy, the tiny model's reply to it reaches 4000 tokens without an EOS
    wait_for(page, lambda d: health(server)["rows_decoding"] == 1 and replies(d)[0])
    by_id(page, "stop").click()
    wait_for(page, lambda d: "stopped" in d.find_element("css selector", ".msg.assistant").text)
    wait_for(page, lambda d: health(server)["rows_decoding"] == 0, timeout=30)
    assert health(server)["rows_parked"] >= 1
    set_field(page, "max-tokens", 3)
    say(page, "t11")
    assert wait_for_reply(page, 2)
    assert by_id(page, "error").get_attribute("hidden") is not None


STUB_FETCH = """
const [pieces, fail] = arguments;
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (!String(url).endsWith('/v1/chat/completions')) return realFetch(url, init);
  if (fail) return Promise.reject(new TypeError('Failed to fetch'));
  const encoder = new TextEncoder();
  const body = new ReadableStream({start(controller) {
    for (const content of pieces) {
      const chunk = {choices: [{index: 0, delta: {content}, finish_reason: null}]};
      controller.enqueue(encoder.encode('data: ' + JSON.stringify(chunk) + '\\n\\n'));
    }
    controller.enqueue(encoder.encode('data: [DONE]\\n\\n'));
    controller.close();
  }});
  return Promise.resolve(new Response(body, {headers: {'Content-Type': 'text/event-stream'}}));
};
"""


def test_html_in_a_reply_or_a_message_shows_as_text(page):
    """A tiny model's reply cannot be steered, so the page's fetch of the completion is
    replaced (in the page) by a stream of chosen server-sent events: the page's own parsing
    and insertion then show a `<script>` reply, and an `<img onerror>` message, as their
    characters, creating no element and running nothing."""
    reply = ["<scr", "ipt>window.pwned = 1</script>", '<img src=x onerror="window.pwned = 2">']
    message = '<b>bold</b><img src=x onerror="window.pwned = 3">'
    page.execute_script(STUB_FETCH, reply, False)
    say(page, message)
    assert wait_for_reply(page, 1) == "".join(reply)
    time.sleep(0.5)  # an image's onerror, had one been made, would have run by now
    user = page.execute_script("return document.querySelector('.msg.user .text').textContent")
    assert user == message
    made = page.execute_script(
        "return document.querySelectorAll('#messages script, #messages img, #messages b').length"
    )
    assert made == 0 and page.execute_script("return window.pwned") is None


def test_errors_show_in_the_page(page):
    """A request the server refuses (400) and a connection that fails are shown, not hung on."""
    set_field(page, "temperature", 5)
    say(page, "t5")
    wait_for(page, lambda d: by_id(d, "error").is_displayed())
    assert "temperature must be in [0, 2]" in by_id(page, "error").text
    assert by_id(page, "send").is_enabled() and not by_id(page, "stop").is_enabled()
    page.execute_script(STUB_FETCH, [], True)
    set_field(page, "temperature", 0)
    say(page, "t6")
    wait_for(page, lambda d: "connection lost" in by_id(d, "error").text)
    assert by_id(page, "send").is_enabled()


def test_the_page_asks_for_the_key_once(browser, server):
    """Without a stored key the page asks for it; a wrong one is asked again; the right one is
    kept in the browser's storage and not asked for after a reload."""
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server.url + "/")
    wait_for(browser, lambda d: by_id(d, "key-form").is_displayed())
    assert "API key" in by_id(browser, "error").text
    for key in ("wrong", KEY):
        wait_for(browser, lambda d: by_id(d, "key-form").is_displayed())
        set_field(browser, "api-key", key)
        by_id(browser, "save-key").click()
    wait_for(browser, lambda d: by_id(d, "model").text == "ckpt")
    assert not by_id(browser, "key-form").is_displayed()
    assert browser.execute_script("return localStorage.getItem('jaxsink.apiKey')") == KEY
    browser.get(server.url + "/")
    wait_for(browser, lambda d: by_id(d, "model").text == "ckpt")
    assert not by_id(browser, "key-form").is_displayed()
