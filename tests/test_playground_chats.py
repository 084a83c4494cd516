"""Chats people keep: the chat page in a real Chromium against a real daphne and a real swarm.

The swarm has two block servers, one announcing a public name (blocks 0:4) and one without
(4:8), so a reply's route shows a name and a short peer id. Chats live in the browser's
localStorage: a reload keeps them, the list switches between them, regenerate answers the last
message again (greedy: the same text), the system prompt travels with the session, and sampling
values the server would refuse are refused on the page first and by the server anyway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from playground.client import PlaygroundClient
from swarm.local_swarm import LocalSwarm
from tests.conftest import DEMO_MODEL, ROOT, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.browser]

PUBLIC_NAME = "chat-test-server"
MODELS = {"demo": {"path": DEMO_MODEL, "display_name": "Demo (tiny Llama, 8 blocks)"}}
CHROMIUM = "/usr/bin/chromium"
IDLE_TIMEOUT = 4  # seconds; the site's PLAYGROUND_IDLE_TIMEOUT
STORAGE_KEY = "swarm-chats-v1"
LAST_DONE = (
    "(n) => { const all = document.querySelectorAll('.message.assistant');"
    " return all.length === n && all[n - 1].dataset.state === 'done'; }"
)


@pytest.fixture(scope="module")
def swarm(make_swarm) -> Iterator[LocalSwarm]:
    swarm: LocalSwarm = make_swarm()
    try:
        swarm.start_dht()
        named = swarm.start_server(DEMO_MODEL, "--block-indices", "0:4", "--public-name", PUBLIC_NAME, wait=False)
        unnamed = swarm.start_server(DEMO_MODEL, "--block-indices", "4:8", wait=False)
        named.wait_until_online()
        unnamed.wait_until_online()
    except BaseException:
        swarm.close()
        raise
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def site(swarm, tmp_path_factory) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "DEBUG": "1",
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "VAR_DIR": str(tmp_path_factory.mktemp("chats-var")),
        "SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers),
        "PLAYGROUND_MODELS": json.dumps(MODELS),
        "PLAYGROUND_SESSIONS_PER_CLIENT": "16",  # every reload opens a socket; closed ones free theirs
        # Sockets idle this long are closed; the page reconnects with the next message (a test waits for it).
        "PLAYGROUND_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
    }
    daphne = str(Path(sys.executable).parent / "daphne")
    process = swarm.spawn_command(
        "chats-daphne", [daphne, "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"], env
    )
    try:
        process.wait_for_line(lambda line: "Listening on TCP address" in line, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        unavailable("Chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, site):
    """A fresh browser profile (empty localStorage) on the chat page, the model available, greedy."""
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    open_chat_page(page, site)
    try:
        yield page
        assert page.errors == []
    finally:
        context.close()


def open_chat_page(page, site: str) -> None:
    page.goto(f"{site}/chat/")
    page.wait_for_function("document.getElementById('model-status').dataset.state === 'available'", timeout=60000)
    greedy(page)


def greedy(page, tokens: int = 12) -> None:
    page.uncheck("#do-sample")
    page.fill("#repetition-penalty", "1")
    page.fill("#max-new-tokens", str(tokens))


def say(page, text: str, replies: int) -> str:
    """Send `text`; wait until the chat has `replies` finished replies; the last one's text."""
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(LAST_DONE, arg=replies, timeout=60000)
    return page.locator(".message.assistant").last.locator(".text").inner_text()


def texts(page) -> list[str]:
    return page.eval_on_selector_all(".message .text", "(nodes) => nodes.map((n) => n.textContent)")


def stored_chats(page) -> dict:
    return page.evaluate(f"JSON.parse(localStorage.getItem('{STORAGE_KEY}'))")


def keep_chats(page, site: str, store: dict) -> None:
    """Put `store` in the browser's localStorage (as an earlier visit left it) and open the chat page."""
    page.goto(f"{site}/v1/models")  # another page of the site: the chat page saves its own store as it goes
    page.evaluate(f"(store) => localStorage.setItem('{STORAGE_KEY}', JSON.stringify(store))", store)
    open_chat_page(page, site)


def kept_chat(chat_id: str, model: str, exchanges: list[tuple[str, str]]) -> dict:
    messages = []
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant, "state": "done"}]
    return {"id": chat_id, "title": "", "model": model, "system": "", "messages": messages, "updated": 1.7e9}


def test_a_reload_keeps_the_chat_and_the_list_switches_chats(page, site, swarm):
    first = say(page, "What is a list?", 1)
    assert first.strip()
    meta = page.locator(".message.assistant .meta").inner_text()
    unnamed = swarm.processes[2].peer_id  # the DHT, the named server, then this one
    assert f"route: {PUBLIC_NAME} blocks 0:4 → …{unnamed[-6:]} blocks 4:8" in meta, meta
    kept = texts(page)

    page.reload()
    open_chat_page(page, site)
    assert texts(page) == kept  # the conversation came back from localStorage
    assert page.locator(".message.assistant .meta").inner_text() == meta
    assert page.locator("#chat-list .chat-item").count() == 1
    assert page.locator("#chat-list .chat-title").inner_text() == "What is a list?"

    # After the reload the servers hold nothing: the follow-up carries the chat so far.
    second = say(page, "And a tuple?", 2)
    assert second.strip() and len(texts(page)) == 4

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    say(page, "Explain the for statement.", 1)
    assert page.locator("#chat-list .chat-item").count() == 2

    page.click("#chat-list .chat-item:has-text('What is a list?') .open-chat")
    assert texts(page)[:2] == kept and len(texts(page)) == 4
    assert page.locator("#chat-list .chat-item[aria-current=true] .chat-title").inner_text() == "What is a list?"

    page.click("#chat-list .chat-item:has-text('Explain the for statement.') .delete-chat")
    assert page.locator("#chat-list .chat-item").count() == 1
    page.reload()
    open_chat_page(page, site)
    assert page.locator("#chat-list .chat-item").count() == 1 and texts(page)[:2] == kept

    # Copy puts the reply's text on the clipboard.
    page.locator(".message.assistant").first.locator(".copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == kept[1]


def test_regenerate_replaces_the_last_reply_with_the_same_greedy_text(page, site):
    say(page, "What is a list?", 1)
    first = say(page, "What is a dictionary?", 2)
    assert page.locator(".message.assistant").first.locator(".regenerate").is_hidden()  # only the last one

    page.locator(".message.assistant").last.locator(".regenerate").click()
    page.wait_for_function(LAST_DONE, arg=2, timeout=60000)
    assert page.locator(".message.assistant").count() == 2  # replaced, not added
    assert page.locator(".message.assistant").last.locator(".text").inner_text() == first

    # After a reload there is no live session: the chat up to the last message is resent.
    page.reload()
    open_chat_page(page, site)
    page.locator(".message.assistant").last.locator(".regenerate").click()
    page.wait_for_function(LAST_DONE, arg=2, timeout=60000)
    assert page.locator(".message.assistant").count() == 2
    assert page.locator(".message.assistant").last.locator(".text").inner_text() == first


def test_the_system_prompt_is_sent_with_the_session(page):
    sent: list[dict] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))
    page.fill("#system-prompt", "Answer in one word.")
    say(page, "What is a list?", 1)
    opened = [message for message in sent if message["type"] == "open_inference_session"]
    assert opened and opened[-1]["system_prompt"] == "Answer in one word." and opened[-1]["history"] == []

    # A new system prompt mid-chat: the next message opens a session with it and the chat so far.
    page.fill("#system-prompt", "Answer in French.")
    page.dispatch_event("#system-prompt", "change")
    say(page, "And a tuple?", 2)
    opened = [message for message in sent if message["type"] == "open_inference_session"]
    assert opened[-1]["system_prompt"] == "Answer in French." and len(opened[-1]["history"]) == 2


def test_sampling_values_the_server_refuses_are_refused_on_the_page_and_by_the_server(page, site):
    page.check("#do-sample")
    assert page.is_enabled("#temperature") and page.is_enabled("#top-p") and page.is_enabled("#top-k")
    page.fill("#temperature", "5")
    message = "Temperature must be above 0 and at most 2 (got 5)."
    assert page.inner_text("#sampling-error") == message
    page.fill("#prompt", "Hello?")
    page.click("#send")
    assert page.inner_text("#chat-error") == message
    assert page.locator(".message").count() == 0  # nothing was sent
    assert page.input_value("#prompt") == "Hello?"  # nor lost

    # Greedy mode ignores the sampling fields: they are disabled, and a value in them stops nothing.
    page.uncheck("#do-sample")
    assert page.is_disabled("#temperature") and page.is_disabled("#top-p") and page.is_disabled("#top-k")
    assert page.is_hidden("#sampling-error")
    page.click("#send")
    page.wait_for_function(LAST_DONE, arg=1, timeout=60000)

    async def over_the_socket() -> dict:
        client = await PlaygroundClient.connect(site.replace("http", "ws") + "/api/v2/generate")
        try:
            assert await client.open_session("demo", max_length=64) == {"ok": True}
            await client.send({"type": "generate", "user_message": "Hi", "do_sample": 1, "temperature": 5})
            return await client.receive(timeout=30)
        finally:
            await client.close()

    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # Playwright's loop runs in this thread
        refused = thread.submit(asyncio.run, asyncio.wait_for(over_the_socket(), 60)).result()
    assert refused == {"ok": False, "traceback": "`temperature` must be above 0 and at most 2 (got 5)"}


def test_the_chat_page_fits_a_phone(browser, site):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        open_chat_page(page, site)
        say(page, "What is a list?", 1)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for selector in ("#chat-list .chat-item", "#prompt", "#send", ".message.assistant .regenerate"):
            box = page.locator(selector).first.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)
    finally:
        context.close()


def test_a_chat_whose_model_was_renamed_in_the_catalog_is_kept_and_goes_on(page, site):
    """The chat was with "demo-old", which the catalog now calls "demo": the chat stays, says so, goes on."""
    chat = kept_chat("renamed", "demo-old", [("What is a list?", "A list is a sequence of items.")])
    keep_chats(page, site, {"chats": [chat], "current": "renamed"})
    assert texts(page) == ["What is a list?", "A list is a sequence of items."]
    assert page.locator("#chat-list .chat-item").count() == 1
    note = page.inner_text("#chat-note")
    assert "“demo-old”, which this site no longer offers" in note and "Demo (tiny Llama, 8 blocks)" in note

    say(page, "And a tuple?", 2)
    assert page.is_hidden("#chat-error")
    stored = stored_chats(page)["chats"]
    assert len(stored) == 1 and stored[0]["model"] == "demo" and stored[0]["formerModel"] == "demo-old"
    assert len(stored[0]["messages"]) == 4


def test_a_long_chat_goes_on_after_a_reload_without_its_oldest_messages(page, site):
    """72 messages, 72,000 characters: more than a session's history may carry (64,000 characters) and
    far more tokens than the session holds (2048). The page sends the latest messages that the limits
    allow, the server leaves out more (tokens), and the page says how many the model does not see."""
    question, answer = "tell me more about lists and tuples, " * 8, "a list can change, a tuple not; " * 54
    exchanges = [(f"Question {i}: {question}", f"Answer {i}: {answer}") for i in range(36)]
    keep_chats(page, site, {"chats": [kept_chat("long", "demo", exchanges)], "current": "long"})
    sent: list[dict] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))

    say(page, "One more question?", 37)
    assert page.is_hidden("#chat-error")
    opened = [message for message in sent if message["type"] == "open_inference_session"][-1]
    history = opened["history"]
    assert sum(len(message["content"]) for message in history) <= 64000 and len(history) < 72
    assert history[-1]["content"] == exchanges[-1][1]  # the latest messages go

    note = page.inner_text("#chat-note")
    dropped = int(re.search(r"its (\d+) oldest messages are left out", note).group(1))
    assert dropped > 72 - len(history)  # the server left out some more: 2048 tokens hold few of them
    assert page.locator(".message[data-context=out]").count() == dropped
    assert page.locator(".message").nth(dropped).get_attribute("data-context") is None
    assert len(stored_chats(page)["chats"][0]["messages"]) == 74  # nothing is deleted from the chat


def test_an_idle_close_is_not_an_error_and_the_next_message_reconnects(page):
    with page.expect_websocket() as first:
        say(page, "What is a list?", 1)
    first.value.wait_for_event("close", timeout=(IDLE_TIMEOUT + 30) * 1000)  # the server closed it, idle
    assert page.is_hidden("#chat-error")
    assert page.locator(".message.assistant").last.get_attribute("data-state") == "done"

    with page.expect_websocket() as second:  # a new socket, and a session with the chat so far
        say(page, "And a tuple?", 2)
    assert second.value is not first.value and page.is_hidden("#chat-error")
