"""The playground end to end: a real swarm of two block servers (both 0:8), a real daphne serving
the site, and clients talking to it over websockets, HTTP, the OpenAI library and a browser.

Tests run in file order and share the swarm and the web server; the last ones pause and kill
servers, so they come last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from playground.client import PlaygroundClient
from swarm import AutoDistributedModelForCausalLM
from swarm.demo_models import DEMO_DRAFT_MODEL_PATH
from swarm.local_swarm import LocalSwarm, SwarmProcess, free_port
from tests.conftest import DEMO_MODEL, ROOT, unavailable

pytestmark = pytest.mark.integration

EOT = "<|eot_id|>"
STEP_TIMEOUT = 10  # the site's PLAYGROUND_STEP_TIMEOUT in these tests
SESSIONS_PER_CLIENT = 3
# A second model that no server holds (its own DHT prefix), for the errors users see then.
MODELS = {
    # With the shipped draft, as the site's default catalog: every reply below is drafted and verified.
    "demo": {"path": DEMO_MODEL, "display_name": "Demo (tiny Llama, 8 blocks)", "draft": str(DEMO_DRAFT_MODEL_PATH)},
    "ghost": {
        "path": DEMO_MODEL,
        "display_name": "Ghost",
        "dht_prefix": "ghost-hf",
        "client": {"missing_blocks_timeout": 1},
    },
}
# Greedy without a repetition penalty: the demo model loops, so the reply runs until stopped.
LONG_REPLY = {"max_new_tokens": 1000, "do_sample": 0, "repetition_penalty": 1.0}


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclasses.dataclass
class Site:
    url: str
    ws_url: str
    process: SwarmProcess


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm: LocalSwarm = make_swarm()
    try:
        swarm.start_dht()
        servers = [swarm.start_server(DEMO_MODEL, "--block-indices", "0:8", wait=False) for _ in range(2)]
        for server in servers:
            server.wait_until_online()
    except BaseException:
        swarm.close()
        raise
    yield swarm
    swarm.close()


def servers_by_peer(swarm: LocalSwarm) -> dict[str, SwarmProcess]:
    return {process.peer_id: process for process in swarm.processes if process.peer_id}


@pytest.fixture(scope="module")
def site(swarm, tmp_path_factory):
    port = free_port()
    env = {
        "DEBUG": "1",
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "VAR_DIR": str(tmp_path_factory.mktemp("site-var")),
        "SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers),
        "PLAYGROUND_STEP_TIMEOUT": str(STEP_TIMEOUT),
        "PLAYGROUND_SESSIONS_PER_CLIENT": str(SESSIONS_PER_CLIENT),
        "PLAYGROUND_MODELS": json.dumps(MODELS),
        "PLAYGROUND_MISSING_BLOCKS_TIMEOUT": "5",
        # The engine notices a dead server when a step times out: keep that well under the step timeout.
        "SWARM_REQUEST_TIMEOUT": "4",
    }
    daphne = str(Path(sys.executable).parent / "daphne")
    process = swarm.spawn_command(
        "daphne", [daphne, "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"], env
    )
    try:
        process.wait_for_line(lambda line: "Listening on TCP address" in line, timeout=60)
        yield Site(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/api/v2/generate", process)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def reference(swarm):
    """The embedded client itself, in this process: what the site's answers must equal."""
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    yield model
    model.close()


def greedy_ids(reference, ids: list[int], new_tokens: int) -> list[int]:
    output = reference.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return output[0, len(ids) :].tolist()


async def connect(site: Site) -> PlaygroundClient:
    """A client with an open session; retries while earlier tests' sessions are being freed."""
    for _ in range(50):
        client = await PlaygroundClient.connect(site.ws_url)
        answer = await client.open_session("demo", max_length=512)
        if answer == {"ok": True}:
            return client
        await client.close()
        assert "too many open sessions" in answer["traceback"], answer
        await asyncio.sleep(0.2)
    raise AssertionError("could not open a session")


async def collect(client: PlaygroundClient, **params) -> list[dict]:
    return [message async for message in client.generate(**params)]


# ----- websocket: streaming, session reuse, stop -----


def test_streamed_greedy_text_equals_the_clients_own_generate(site, reference, tokenizer, swarm):
    prompt = chat_prompt(tokenizer, "Tell me about lists.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    expected = tokenizer.decode(greedy_ids(reference, prompt_ids, 24))

    async def scenario():
        client = await connect(site)
        try:
            return await collect(client, inputs=prompt, stop_sequence=EOT, max_length=len(prompt_ids) + 24, do_sample=0)
        finally:
            await client.close()

    messages = run(scenario())
    assert all(m["ok"] for m in messages), messages
    assert len(messages) > 5, "tokens must arrive one message at a time"
    assert [m["stop"] for m in messages] == [False] * (len(messages) - 1) + [True]
    assert "".join(m["outputs"] for m in messages) == expected
    final = messages[-1]
    assert sum(m["token_count"] for m in messages) == final["reply_tokens"] <= 24
    assert final["tokens_per_second"] > 0
    assert 0 < final["round_trips"] < final["reply_tokens"]  # the draft's tokens verified several at a time
    assert [(span["start"], span["end"]) for span in final["route"]] == [(0, 8)]
    assert final["route"][0]["peer_id"] in servers_by_peer(swarm)


def test_follow_up_turn_sends_only_new_tokens(site, reference, tokenizer):
    first = chat_prompt(tokenizer, "Tell me about lists.")
    # The first reply is cut by its length, so the next turn closes it first (as the chat page does).
    second = EOT + chat_prompt(tokenizer, "And tuples?").removeprefix("<|begin_of_text|>")
    first_ids = tokenizer(first, add_special_tokens=False).input_ids
    second_ids = tokenizer(second, add_special_tokens=False).input_ids
    first_reply = greedy_ids(reference, first_ids, 10)
    conversation = first_ids + first_reply + second_ids
    expected = tokenizer.decode(greedy_ids(reference, conversation, 12))

    async def scenario():
        client = await connect(site)
        try:
            one = await collect(client, inputs=first, max_new_tokens=10, do_sample=0)  # one answer, no streaming
            two = await collect(
                client, inputs=second, stop_sequence=EOT, max_new_tokens=1, max_length=len(conversation) + 12
            )
            return one, two
        finally:
            await client.close()

    one, two = run(scenario())
    assert len(one) == 1 and one[0]["outputs"] == tokenizer.decode(first_reply) and one[0]["stop"]
    # The last token was sampled, not sent yet; drafted tokens the model rejected were sent too (and rolled back).
    assert one[0]["tokens_sent"] >= len(first_ids) + 10 - 1
    assert "".join(m["outputs"] for m in two) == expected
    # The servers kept the first turn: only its last token, the new turn and the new reply (with its rejected
    # drafts) were sent.
    assert two[-1]["tokens_sent"] >= 1 + len(second_ids) + two[-1]["reply_tokens"] - 1
    assert two[-1]["tokens_sent"] < len(conversation)


def test_stop_ends_the_reply_and_the_next_request_works(site):
    async def scenario():
        client = await connect(site)
        try:
            await client.send({"type": "generate", "user_message": "Explain the for statement.", **LONG_REPLY})
            streamed = [await client.receive() for _ in range(3)]
            assert all(m["ok"] and not m["stop"] for m in streamed), streamed
            await client.stop()
            rest = []
            while not rest or not rest[-1]["stop"]:
                rest.append(await client.receive())
            after = await collect(client, user_message="And tuples?", max_new_tokens=6)
            return streamed + rest, after
        finally:
            await client.close()

    stopped, after = run(scenario())
    assert stopped[-1]["stop_reason"] == "cancelled" and stopped[-1]["reply_tokens"] < LONG_REPLY["max_new_tokens"]
    assert after[-1]["ok"] and after[-1]["stop"] and after[-1]["stop_reason"] in ("length", "eos")
    assert after[-1]["reply_tokens"] >= 1


def test_bad_requests_get_clear_errors_and_the_socket_stays_usable(site):
    async def scenario():
        client = await PlaygroundClient.connect(site.ws_url)
        answers = []
        try:
            for message in [
                b"\x00\x01binary",
                "{not json",
                {"type": "generate", "inputs": "x", "max_new_tokens": 1},
                {"type": "open_inference_session", "model": "demo", "max_length": 10**6},
                {"type": "open_inference_session", "model": "unknown-model", "max_length": 64},
                {"type": "open_inference_session", "model": "demo", "max_length": "64"},
            ]:
                await client.send(message)
                answers.append(await client.receive())
            assert await client.open_session("demo", max_length=64) == {"ok": True}
            for message in [
                {"type": "generate", "inputs": "x", "stop_sequence": "s" * 10_000},
                {"type": "generate", "inputs": "x", "stop_sequence": "two words", "extra_stop_sequences": ["\n"]},
                {"type": "generate", "inputs": "x " * 100, "max_new_tokens": 5},  # longer than the session
                {"type": "generate", "inputs": "x", "max_new_tokens": 10**6},
                {"type": "generate", "inputs": "x", "temperature": "hot", "do_sample": 1},
                {"type": "generate", "inputs": "x"},  # neither a length nor a stop sequence
            ]:
                await client.send(message)
                answers.append(await client.receive())
            await client.send({"type": "generate", "user_message": "Explain the for statement.", **LONG_REPLY})
            await client.send({"type": "generate", "inputs": "again", "max_new_tokens": 2})
            busy = None
            while True:  # the second generate is refused while the first streams
                message = await client.receive()
                if not message["ok"]:
                    busy = message
                    await client.stop()
                elif message["stop"]:
                    break
            answers.append(busy)
            works = await collect(client, inputs=" and", max_new_tokens=3, do_sample=0)
            return answers, works
        finally:
            await client.close()

    answers, works = run(scenario())
    problems = [
        "binary frames are not supported",
        "must be JSON",
        "open a session first",
        "above this server's limit",
        "unknown model 'unknown-model'",
        "`max_length` must be an integer",
        "`stop_sequence` has 10000 characters; the limit is 100",
        "exactly one token",
        "this session allows 64",
        "`max_new_tokens` is 1000000, above this server's limit",
        "`temperature` must be a number",
        "set `max_new_tokens` or `max_length`",
        "a reply is still being generated",
    ]
    assert len(answers) == len(problems)
    for answer, problem in zip(answers, problems):
        assert answer["ok"] is False and problem in answer["traceback"], (problem, answer)
        assert "Traceback" not in answer["traceback"]
    assert works[-1]["ok"] and works[-1]["stop"] and works[-1]["reply_tokens"] == 3


# ----- HTTP APIs -----


def post(url: str, data: bytes, content_type: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}") if "json" in e.headers.get("Content-Type", "") else {}


def test_http_generate_api(site, reference, tokenizer):
    prompt = "Numbers are created by numeric literals"
    expected = tokenizer.decode(greedy_ids(reference, tokenizer(prompt).input_ids, 8))
    form = urllib.parse.urlencode({"model": "demo", "inputs": prompt, "max_new_tokens": 8, "do_sample": 0}).encode()
    status, answer = post(f"{site.url}/api/v1/generate", form, "application/x-www-form-urlencoded")
    assert status == 200 and answer["ok"] and answer["outputs"] == expected
    body = json.dumps({"model": "demo", "inputs": prompt, "max_new_tokens": 8}).encode()
    status, answer = post(f"{site.url}/api/v1/generate", body, "application/json")
    assert status == 200 and answer["outputs"] == expected and answer["route"][0]["start"] == 0
    status, answer = post(f"{site.url}/api/v1/generate", b'{"model": "demo", "inputs": "x"}', "application/json")
    assert status == 400 and answer == {"ok": False, "traceback": "set `max_new_tokens` or `max_length`"}
    status, answer = post(
        f"{site.url}/api/v1/generate", form, "application/x-www-form-urlencoded", {"Origin": "http://evil.example"}
    )
    assert status == 403 and answer["traceback"].startswith("cross-site request refused")  # a cross-site browser form


def test_openai_client_streams_a_chat_completion(site, reference, tokenizer):
    import openai

    question = "Tell me about lists."
    prompt_ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids
    expected = tokenizer.decode(greedy_ids(reference, prompt_ids, 20), skip_special_tokens=True)
    client = openai.OpenAI(base_url=f"{site.url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": question}]

    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3 and "".join(deltas) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)

    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == len(prompt_ids) and 0 < whole.usage.completion_tokens <= 20
    assert [m.id for m in client.models.list()] == ["demo", "ghost"]
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="gpt-4o", messages=messages)


# ----- limits and availability -----


def test_sessions_per_client_address_are_limited(site):
    async def scenario():
        clients = [await connect(site) for _ in range(SESSIONS_PER_CLIENT)]
        extra = await PlaygroundClient.connect(site.ws_url)
        try:
            refused = await extra.open_session("demo", max_length=64)
            await clients.pop().close()
            for _ in range(50):  # the server frees the closed socket's session right after the close
                admitted = await extra.open_session("demo", max_length=64)
                if admitted["ok"]:
                    break
                await asyncio.sleep(0.1)
            return refused, admitted
        finally:
            for client in [*clients, extra]:
                await client.close()

    refused, admitted = run(scenario())
    limit = f"too many open sessions from your address (limit {SESSIONS_PER_CLIENT}); close another chat first"
    assert refused == {"ok": False, "traceback": limit}
    assert admitted == {"ok": True}


def test_models_api_reports_live_availability(site):
    with urllib.request.urlopen(f"{site.url}/api/v1/models", timeout=60) as response:
        demo, ghost = json.loads(response.read())["models"]
    assert demo["name"] == "demo" and demo["state"] == "available" and demo["source"] == "swarm"
    assert demo["servers"] == 2 and demo["missing_blocks"] == []
    assert demo["message"] == "all 8 blocks announced (not checked) by 2 server(s)"
    assert ghost["state"] == "unavailable" and ghost["missing_blocks"] == list(range(8))


def test_unserved_blocks_give_a_readable_error_and_the_socket_stays_usable(site):
    async def scenario():
        client = await PlaygroundClient.connect(site.ws_url)
        try:
            assert await client.open_session("ghost", max_length=64) == {"ok": True}
            failed = await collect(client, inputs="Hello", max_new_tokens=2)
            assert await client.open_session("demo", max_length=64) == {"ok": True}
            works = await collect(client, inputs="Hello", max_new_tokens=2)
            return failed, works
        finally:
            await client.close()

    failed, works = run(scenario())
    assert failed == [
        {"ok": False, "traceback": "blocks 0:8 are not served right now; try again when more servers are online"}
    ]
    assert works[-1]["ok"] and works[-1]["reply_tokens"] == 2


def test_websocket_refuses_foreign_origins_and_serves_scripts(site):
    async def scenario():
        foreign = await PlaygroundClient.connect(site.ws_url, origin="http://evil.example")
        refusal = await foreign.receive(timeout=10)
        with pytest.raises(ConnectionError):
            await foreign.receive(timeout=10)
        script = await PlaygroundClient.connect(site.ws_url, origin="")  # no Origin header, as scripts send
        try:
            return refusal, foreign.close_code, await script.open_session("demo", max_length=32)
        finally:
            await script.close()

    refusal, code, opened = run(scenario())
    assert refusal["ok"] is False and refusal["traceback"].startswith("origin 'http://evil.example' may not use")
    assert code == 4003
    assert opened == {"ok": True}


# ----- the chat page in a real browser -----


@pytest.mark.browser
def test_chat_page_streams_stops_and_continues(site):
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium"):
        unavailable("Chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{site.url}/chat/")
            page.wait_for_function(
                "document.getElementById('model-status').dataset.state === 'available'", timeout=60000
            )
            assert "all 8 blocks announced (not checked) by 2 server(s)" in page.inner_text("#model-status")
            page.uncheck("#do-sample")
            page.fill("#repetition-penalty", "1")
            page.fill("#max-new-tokens", str(LONG_REPLY["max_new_tokens"]))

            page.fill("#prompt", "Explain the for statement.")
            page.click("#send")
            reply = page.locator(".message.assistant").last
            chunks = "Number(document.querySelector('.message.assistant:last-child')?.dataset.chunks || 0)"
            # Chunk count and text are read in one evaluation: tokens keep arriving between two calls.
            snapshot = (
                "(() => { const r = document.querySelector('.message.assistant:last-child');"
                " return [Number(r.dataset.chunks || 0), r.querySelector('.text').textContent.length]; })()"
            )
            page.wait_for_function(f"{chunks} >= 2", timeout=60000)
            early_chunks, early = page.evaluate(snapshot)
            page.wait_for_function(f"{chunks} >= {early_chunks + 4}", timeout=60000)
            later_chunks, later = page.evaluate(snapshot)
            grew = f"the reply's text must grow as tokens arrive ({early_chunks} -> {later_chunks} chunks)"
            assert 0 < early < later, grew
            assert reply.get_attribute("data-state") == "streaming" and page.is_visible("#stop")
            page.click("#stop")
            page.wait_for_function(
                "document.querySelector('.message.assistant:last-child').dataset.state === 'stopped'", timeout=30000
            )
            assert "stopped" in reply.locator(".meta").inner_text()
            assert page.is_hidden("#stop") and page.is_enabled("#send")

            page.fill("#max-new-tokens", "12")
            page.fill("#prompt", "And tuples?")
            page.press("#prompt", "Enter")
            page.wait_for_function(
                "document.querySelectorAll('.message.assistant').length === 2 && "
                "document.querySelector('.message.assistant:last-child').dataset.state === 'done'",
                timeout=60000,
            )
            second = page.locator(".message.assistant").last
            meta = second.locator(".meta").inner_text()
            # (with the draft, the tokens it brought per round trip)
            drafted = r"( · [\d.]+ tokens per round trip)?"
            pattern = rf"\d+ tokens · [\d.]+ tokens/s{drafted}( · length limit)? · route: \S+ blocks 0:8"
            assert re.search(pattern, meta), meta
            assert len(second.locator(".text").inner_text()) > 0
            assert page.locator(".message.user").count() == 2

            # A model nobody serves: the picker says so, and sending explains which blocks are missing.
            page.select_option("#model", "ghost")
            assert page.locator(".message").count() == 0  # a new chat
            page.wait_for_function("document.getElementById('model-status').dataset.state === 'unavailable'")
            assert "no server holds this model right now" in page.inner_text("#model-status")
            page.fill("#prompt", "Hello?")
            page.click("#send")
            page.wait_for_selector("#chat-error:not([hidden])", timeout=30000)
            assert page.inner_text("#chat-error") == (
                "blocks 0:8 are not served right now; try again when more servers are online"
            )
            assert page.locator(".message.assistant").last.get_attribute("data-state") == "error"
            assert errors == []
        finally:
            browser.close()


# ----- failures of the swarm (these come last: they pause and kill servers) -----


def test_stalled_servers_end_the_reply_with_a_timeout_and_the_socket_recovers(swarm, settings):
    """Through Channels' communicator on the real ASGI app, in this process, with a short step timeout
    (shorter than the engine's own request timeout, so that the site's bound is what fires)."""
    from channels.testing import WebsocketCommunicator

    from config.asgi import application
    from playground.registry import registry

    settings.SWARM_INITIAL_PEERS = swarm.initial_peers
    settings.PLAYGROUND_STEP_TIMEOUT = step_timeout = 3
    servers = list(servers_by_peer(swarm).values())

    async def scenario():
        headers = [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1")]
        communicator = WebsocketCommunicator(application, "/api/v2/generate", headers=headers)
        assert (await communicator.connect())[0]

        async def receive(timeout: float = 60.0) -> dict:
            return json.loads(await communicator.receive_from(timeout))

        try:
            await communicator.send_json_to({"type": "open_inference_session", "model": "demo", "max_length": 1024})
            assert await receive() == {"ok": True}
            await communicator.send_json_to(
                {"type": "generate", "user_message": "Explain the for statement.", **LONG_REPLY}
            )
            assert (await receive())["ok"]
            for server in servers:
                server.signal(signal.SIGSTOP)
            try:
                began = time.monotonic()
                while (message := await receive(step_timeout * 3))["ok"]:
                    pass
                waited = time.monotonic() - began
            finally:
                for server in servers:
                    server.signal(signal.SIGCONT)
            await communicator.send_json_to({"type": "generate", "inputs": " and", "max_new_tokens": 3, "do_sample": 0})
            after = await receive()
            return message, waited, after
        finally:
            await communicator.disconnect()

    try:
        error, waited, after = run(scenario())
    finally:
        registry.shutdown()
    assert (
        error["traceback"] == f"the swarm produced no token for {step_timeout} s, so generation was stopped; try again"
    )
    assert waited >= step_timeout - 0.5  # not before the timeout (the message says which limit fired)
    assert after["ok"] and after["stop"] and after["reply_tokens"] == 3


def test_killing_a_server_mid_reply(site, swarm, reference, tokenizer):
    warmup_ids = tokenizer("Hello").input_ids
    warmup_reply = greedy_ids(reference, warmup_ids, 1)
    prompt = chat_prompt(tokenizer, "Explain the for statement.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    conversation = warmup_ids + warmup_reply + prompt_ids
    expected = tokenizer.decode(greedy_ids(reference, conversation, 60))
    servers = servers_by_peer(swarm)

    async def scenario():
        client = await connect(site)
        try:
            warmup = await collect(client, inputs="Hello", max_new_tokens=1, do_sample=0)
            victim = warmup[-1]["route"][0]["peer_id"]  # the server holding this session
            await client.send(
                {"type": "generate", "inputs": prompt, "stop_sequence": EOT, "max_length": len(conversation) + 60}
            )
            messages = [await client.receive() for _ in range(3)]
            servers[victim].kill()
            while messages[-1]["ok"] and not messages[-1]["stop"]:
                messages.append(await client.receive())
            after = await collect(client, user_message="And tuples?", max_new_tokens=4)
            return victim, messages, after
        finally:
            await client.close()

    victim, messages, after = run(scenario())
    final = messages[-1]
    # The other server holds all 8 blocks too: the engine must replay the session there and carry on, with
    # the very reply an undisturbed swarm gives (an error message here would be a failed failover).
    assert all(m["ok"] for m in messages), messages[-1]
    assert "".join(m["outputs"] for m in messages) == expected
    assert victim not in [span["peer_id"] for span in final["route"]]
    assert after[-1]["ok"] and after[-1]["stop"], after
