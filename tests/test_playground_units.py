"""Playground parts that need no swarm: text streaming, chat formats, validation, limits, CSRF,
and the websocket's answers to bad input through the real ASGI application."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from channels.testing import WebsocketCommunicator
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings
from transformers import AutoTokenizer

from playground.admission import Admission
from playground.catalog import parse_models
from playground.detokenize import IncrementalDecoder, StopMatcher
from playground.errors import BadRequest, LimitExceeded, PlaygroundError, UnknownModel, public_message
from playground.origin import refusal_message
from playground.prompting import format_from_separators, format_from_template
from playground.schemas import coerce_form, parse_chat_completion, parse_generate, parse_open
from tests.conftest import DEMO_MODEL

HOST = "127.0.0.1"
ORIGIN = (b"origin", b"http://127.0.0.1")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


# ----- streaming text -----


def test_incremental_decoder_holds_back_partial_utf8(tokenizer):
    text = "Naïve café: 日本語 🙂 done."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces[:-1], "the byte-level tokenizer splits these characters, so some tokens must be held"


def test_incremental_decoder_matches_whole_decode_with_context(tokenizer):
    prompt = tokenizer("The list of values", return_tensors=None).input_ids
    reply = tokenizer(" is returned by the function, and 'ß' too.", add_special_tokens=False).input_ids
    decoder = IncrementalDecoder(tokenizer, context=prompt)
    streamed = "".join(decoder.push(token) for token in reply) + decoder.flush()
    assert streamed == tokenizer.decode(reply)


def test_stop_matcher_keeps_stop_text_in_petals_mode():
    matcher = StopMatcher(["###"], include=True)
    assert matcher.push("Hello ") == "Hello "
    assert matcher.push("#") == "#"
    assert matcher.matched is None
    assert matcher.push("##\n") == "##\n"
    assert matcher.matched == "###"


def test_stop_matcher_cuts_stop_and_holds_back_possible_beginnings():
    matcher = StopMatcher(["\nUser:", "<|eot_id|>"], include=False)
    assert matcher.push("Hello") == "Hello"
    assert matcher.push("\n") == ""  # could be the start of "\nUser:"
    assert matcher.push("Us") == ""
    assert matcher.push("a") == "\nUsa"  # it was not
    assert matcher.push(" fine<|eot") == " fine"
    assert matcher.push("_id|>tail") == ""
    assert matcher.matched == "<|eot_id|>"


def test_stop_matcher_flushes_held_text_at_the_end():
    matcher = StopMatcher(["STOP"], include=False)
    assert matcher.push("all ST") == "all "
    assert matcher.flush() == "ST"


# ----- chat formats -----


def test_chat_format_from_template_adds_up_to_the_template(tokenizer):
    chat = format_from_template(tokenizer)
    assert chat is not None and chat.stop_sequence == "<|eot_id|>"
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Tell me about lists."},
    ]
    whole = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = (
        chat.user_turn("Hi", first=True, reply_ended=False)
        + "Hello there<|eot_id|>"  # the model generated the end of its turn
        + chat.user_turn("Tell me about lists.", first=False, reply_ended=True)
    )
    assert turns == whole == chat.render(messages)
    # A reply cut short (stopped) gets its end of turn added before the next user message.
    cut = chat.user_turn("Hi", first=True, reply_ended=False) + "Hello there"
    assert cut + chat.user_turn("Tell me about lists.", first=False, reply_ended=False) == whole


def test_chat_format_from_separators():
    chat = format_from_separators(
        {
            "prefix": "",
            "user_start": "###Human: ",
            "user_end": "\n",
            "assistant_start": "###Assistant:",
            "assistant_end": "\n",
        }
    )
    assert chat.stop_sequence == "\n"
    rendered = chat.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert rendered == "###Human: Be brief.\n\nHi\n###Assistant:"


# ----- configuration and validation -----


def test_models_setting_is_validated():
    specs = parse_models({"tiny": "/models/tiny", "big": {"path": "org/Big-1.5", "defaults": {"temperature": 0.5}}})
    assert specs["tiny"].path == "/models/tiny" and specs["tiny"].display_name == "tiny"
    assert specs["big"].defaults.temperature == 0.5
    for bad in ({}, {"x": {}}, {"x": {"path": "p", "colour": 1}}, {"x": {"path": "p", "client": {"nope": 1}}}):
        with pytest.raises(ImproperlyConfigured):
            parse_models(bad)


@override_settings(PLAYGROUND_MAX_LENGTH=256, PLAYGROUND_MAX_NEW_TOKENS=64, PLAYGROUND_MAX_STOP_SEQUENCE_CHARS=20)
def test_websocket_requests_are_validated_against_the_limits():
    assert parse_open({"model": "demo", "max_length": 256}).max_length == 256
    with pytest.raises(LimitExceeded, match="limit of 256"):
        parse_open({"model": "demo", "max_length": 257})
    with pytest.raises(UnknownModel, match="this site serves: demo"):
        parse_open({"model": "gpt-5", "max_length": 10})
    with pytest.raises(BadRequest, match="integer"):
        parse_open({"model": "demo", "max_length": "100"})
    request = parse_generate({"inputs": "x", "do_sample": 1, "temperature": 0.5, "stop_sequence": "</s>"})
    assert request.streaming and request.sampling.do_sample and request.sampling.temperature == 0.5
    for message, problem in [
        ({"inputs": 5}, "`inputs` must be a string"),
        ({"max_new_tokens": 65}, "limit of 64"),
        ({"max_new_tokens": True}, "integer"),
        ({"temperature": 0}, "`temperature` must be above 0"),
        ({"temperature": 5}, r"`temperature` must be above 0 and at most 2 \(got 5\)"),
        ({"top_k": 5000}, "`top_k` must be an integer between 0 and 1000"),
        ({"regenerate": True, "user_message": "x"}, "send no `inputs` or `user_message`"),
        ({"top_p": 1.5}, "`top_p`"),
        ({"do_sample": "yes"}, "`do_sample`"),
        ({"stop_sequence": "x" * 10_000}, "10000 characters; the limit is 20"),
        ({"stop_sequence": "a", "extra_stop_sequences": "b" * 21}, "limit is 20"),
        ({"extra_stop_sequences": ["x"]}, "need a `stop_sequence`"),
        ({"inputs": "a", "user_message": "b"}, "not both"),
    ]:
        with pytest.raises(PlaygroundError, match=problem):
            parse_generate(message)


def test_form_parameters_are_coerced():
    assert coerce_form({"max_new_tokens": "5", "temperature": "0.5", "do_sample": "true", "inputs": "7"}) == {
        "max_new_tokens": 5,
        "temperature": 0.5,
        "do_sample": True,
        "inputs": "7",
    }
    with pytest.raises(BadRequest, match="`top_k` must be an integer"):
        coerce_form({"top_k": "many"})


def test_openai_requests_are_validated():
    ok = parse_chat_completion(
        {
            "model": "demo",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert ok.messages[0]["role"] == "system" and ok.messages[1]["content"] == "Hi"
    assert ok.stop == ("\n",) and ok.stream and ok.include_usage
    for body, problem in [
        ([], "JSON object"),
        ({"model": "demo", "messages": []}, "non-empty"),
        ({"model": "demo", "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n: 1"),
        ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "demo", "messages": [{"role": "assistant", "content": "x"}]}, "last message"),
    ]:
        with pytest.raises(PlaygroundError, match=problem):
            parse_chat_completion(body)


def test_unexpected_errors_become_a_reference_not_a_traceback(caplog):
    error = public_message(ZeroDivisionError("secret detail"), "test")
    assert error.status == 500 and "reference" in str(error) and "secret" not in str(error)
    assert "secret detail" in caplog.text


def test_missing_blocks_message_names_blocks_not_paths():
    from swarm.client.routing import MissingBlocksError

    error = public_message(
        MissingBlocksError(
            "blocks 4–7 of /srv/models/x are not served by any reachable server right now (waited 3 s)",
            model_name="/srv/models/x",
            blocks=[4, 5, 6, 7],
        )
    )
    assert str(error).startswith("blocks 4:8 are not served right now") and "/srv" not in str(error)


# ----- limits -----


@override_settings(PLAYGROUND_SESSIONS_PER_CLIENT=2, PLAYGROUND_MAX_SESSIONS=3)
def test_session_limits_per_address_and_in_total():
    admission = Admission()
    first, second = admission.acquire("10.0.0.1"), admission.acquire("10.0.0.1")
    with pytest.raises(LimitExceeded, match="your address"):
        admission.acquire("10.0.0.1")
    third = admission.acquire("10.0.0.2")
    with pytest.raises(LimitExceeded, match="busy"):
        admission.acquire("10.0.0.3")
    first.release()
    first.release()  # idempotent
    admission.acquire("10.0.0.3")
    assert admission.total == 3 and admission.count("10.0.0.1") == 1
    second.release(), third.release()


# ----- HTTP: CSRF for browsers, JSON errors for API clients -----


def test_cross_site_browser_posts_are_refused_but_api_clients_pass():
    browser = Client(enforce_csrf_checks=True, HTTP_HOST=HOST)
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "n": 3})
    forged = browser.post(
        "/v1/chat/completions", body, content_type="application/json", HTTP_ORIGIN="http://evil.example"
    )
    assert forged.status_code == 403
    error = forged.json()["error"]  # the OpenAI API's error shape
    assert error["code"] == "forbidden" and error["message"].startswith("cross-site request refused: Origin checking")
    assert "http://evil.example" in error["message"] and "send neither an Origin header nor cookies" in error["message"]
    forged = browser.post("/api/v1/generate", {"model": "demo", "inputs": "x"}, HTTP_ORIGIN="http://evil.example")
    assert forged.status_code == 403 and forged.json()["ok"] is False  # chat.petals.dev's
    assert forged.json()["traceback"].startswith("cross-site request refused: Origin checking failed")
    browser.cookies["sessionid"] = "x"  # a cookie but no token: refused, even without an Origin header
    forged = browser.post("/api/v1/generate", {"model": "demo", "inputs": "x"})
    assert forged.status_code == 403 and forged.json()["traceback"].startswith("cross-site request refused: CSRF")
    same_site = Client(enforce_csrf_checks=True, HTTP_HOST=HOST)  # a page of this site: origin passes, token needed
    answer = same_site.post("/api/v1/generate", {"model": "demo", "inputs": "x"}, HTTP_ORIGIN=f"http://{HOST}")
    assert answer.status_code == 403 and "CSRF cookie not set" in answer.json()["traceback"]

    api_client = Client(enforce_csrf_checks=True, HTTP_HOST=HOST)
    answer = api_client.post("/v1/chat/completions", body, content_type="application/json")
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "only `n: 1` is supported"
    answer = api_client.post("/api/v1/generate", {"model": "nope", "inputs": "x", "max_new_tokens": "3"})
    assert answer.status_code == 404 and answer.json() == {
        "ok": False,
        "traceback": "unknown model 'nope'; this site serves: demo, demo-moe",
    }
    assert api_client.get("/v1/models").json()["data"][0]["id"] == "demo"


def test_chat_page_lists_the_configured_models():
    page = Client(HTTP_HOST=HOST).get("/chat/")
    assert page.status_code == 200
    html = page.content.decode()
    assert '<option value="demo">Demo (tiny Llama, 8 blocks)</option>' in html
    assert 'id="playground-config"' in html and "playground/chat.js" in html


# ----- the websocket, through the real ASGI application (origin check included) -----


def _run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _connect(headers=(ORIGIN,)) -> tuple[WebsocketCommunicator, bool]:
    from config.asgi import application

    communicator = WebsocketCommunicator(application, "/api/v2/generate", headers=[(b"host", b"127.0.0.1"), *headers])
    connected, _ = await communicator.connect()
    return communicator, connected


def test_websocket_refuses_foreign_origins_with_a_reason():
    async def scenario():
        for origin in [b"http://evil.example", b"http://127.0.0.1.evil.example", b"null", b"http://[::1"]:
            communicator, connected = await _connect([(b"origin", origin)])
            assert connected  # opened only to say why, then closed: none of the API runs
            refusal = json.loads(await communicator.receive_from(timeout=5))
            assert refusal == {"ok": False, "traceback": refusal_message(origin.decode())}
            assert "may not use this API" in refusal["traceback"] and origin.decode() in refusal["traceback"]
            assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4003}
            await communicator.disconnect()
        # Two Origin headers: refused too.
        communicator, _ = await _connect([ORIGIN, (b"origin", b"http://evil.example")])
        assert json.loads(await communicator.receive_from(timeout=5))["ok"] is False
        await communicator.disconnect()

    _run(scenario())


def test_websocket_serves_scripts_without_an_origin_and_pages_of_this_site():
    async def scenario():
        for headers in [(), (ORIGIN,), ((b"origin", b"https://127.0.0.1"),)]:
            communicator, connected = await _connect(headers)
            assert connected, headers
            # The API itself answers: a session for an unknown model is refused as such, not for the origin.
            await communicator.send_json_to({"type": "open_inference_session", "model": "nope", "max_length": 9})
            answer = json.loads(await communicator.receive_from(timeout=5))
            assert answer["ok"] is False and "unknown model 'nope'" in answer["traceback"], (headers, answer)
            await communicator.disconnect()

    _run(scenario())


def test_a_chat_socket_does_not_depend_on_the_channel_layer():
    """In the full mode the channel layer is Redis; a chat never uses it, so a Redis that does not answer
    must not close chats (each connection used to keep a Redis receive open, and its failure closed it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    dead_redis = {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [f"redis://127.0.0.1:{closed_port}"]},
    }

    async def scenario():
        communicator, connected = await _connect()
        assert connected
        for _ in range(2):
            await communicator.send_json_to({"type": "open_inference_session", "model": "nope", "max_length": 9})
            answer = json.loads(await communicator.receive_from(timeout=5))
            assert answer["ok"] is False and "unknown model 'nope'" in answer["traceback"], answer
        await communicator.disconnect()

    with override_settings(CHANNEL_LAYERS={"default": dead_redis}):
        _run(scenario())


@override_settings(ALLOWED_HOSTS=["chat.example.org"])
def test_websocket_origin_check_follows_allowed_hosts():
    async def scenario():
        communicator, _ = await _connect([(b"origin", b"https://chat.example.org")])
        await communicator.send_json_to({"type": "open_inference_session", "model": "nope", "max_length": 9})
        assert "unknown model" in json.loads(await communicator.receive_from(timeout=5))["traceback"]
        await communicator.disconnect()
        communicator, _ = await _connect([ORIGIN])  # 127.0.0.1 is no longer this site
        assert "may not use this API" in json.loads(await communicator.receive_from(timeout=5))["traceback"]
        await communicator.disconnect()

    _run(scenario())


def test_websocket_answers_bad_input_and_stays_usable():
    async def scenario():
        communicator, connected = await _connect()
        assert connected

        def opening(**fields):
            return {
                "text_data": json.dumps({"type": "open_inference_session", "model": "demo", "max_length": 9, **fields})
            }

        cases = [
            ({"text_data": "not json"}, "must be JSON"),
            ({"bytes_data": b"\x00\xff"}, "binary frames are not supported"),
            ({"text_data": "[1, 2]"}, "JSON object with a `type`"),
            ({"text_data": json.dumps({"type": 5})}, "`type` must be a string"),
            ({"text_data": json.dumps({"type": "dance"})}, "unknown message type 'dance'"),
            ({"text_data": json.dumps({"type": "generate", "inputs": "hi"})}, "open a session first"),
            (opening(model="nope"), "unknown model 'nope'"),
            (opening(max_length=10**9), "above this server's limit"),
            (opening(model=["demo"]), "`model` must be a string"),
            ({"text_data": "[" * 50_000}, "must be JSON"),  # too deep for the parser
            ({"text_data": " " * 200_000}, "far above the input limit"),
        ]
        for frame, problem in cases:
            await communicator.send_to(**frame)
            answer = json.loads(await communicator.receive_from(timeout=5))
            assert answer["ok"] is False and problem in answer["traceback"], (frame, answer)
        await communicator.send_to(text_data=json.dumps({"type": "stop"}))  # nothing to stop: no answer
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()

    _run(scenario())


@override_settings(PLAYGROUND_IDLE_TIMEOUT=0.4)
def test_idle_sockets_are_closed():
    async def scenario():
        communicator, connected = await _connect()
        assert connected
        began = time.monotonic()
        # Closed with the idle code, and no error message first: being idle is not a failure.
        closed = await communicator.receive_output(timeout=5)
        assert closed["type"] == "websocket.close" and closed["code"] == 4000, closed
        assert time.monotonic() - began >= 0.4
        await communicator.disconnect()

    _run(scenario())


# ----- availability from the monitor's latest snapshot -----


@pytest.mark.django_db
def test_availability_comes_from_the_monitor_snapshot_when_there_is_one():
    from django.utils import timezone

    from monitor.models import ModelStatus, Snapshot
    from playground.availability import from_monitor

    assert from_monitor(["demo_model-hf"]) == {}
    now = timezone.now()
    snapshot = Snapshot.objects.create(created_at=now, duration=1.0, num_servers=1)
    ModelStatus.objects.create(
        snapshot=snapshot,
        created_at=now,
        position=0,
        dht_prefix="demo_model-hf",
        name="demo",
        num_blocks=8,
        healthy=False,
        num_servers=1,
        coverage=[1] * 4 + [0] * 4,
        coverage_throughput=[1.0] * 4 + [0.0] * 4,
    )
    found = from_monitor(["demo_model-hf"])["demo_model-hf"]
    assert found.state == "partial" and found.source == "monitor"
    assert found.missing_blocks == (4, 5, 6, 7) and found.message == "blocks 4:8 are not served right now"


def test_availability_read_from_announcements_says_it_was_not_checked():
    from playground.availability import describe

    # Without the monitor, the DHT's announcements are all there is, and anyone can announce.
    assert "not checked" in describe(8, [], 3, "swarm", 0.0).message
    assert describe(8, [], 3, "monitor", 0.0).message == "all 8 blocks served by 3 server(s)"


# ----- chats the browser keeps: system prompt, history, regenerate, reply budget -----


def test_system_prompt_becomes_the_templates_system_turn(tokenizer):
    chat = format_from_template(tokenizer)
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    whole = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turn = chat.user_turn("Hi", first=True, reply_ended=False, system="Answer in French.")
    assert turn == whole == chat.render(messages)
    assert "Answer in French." not in chat.user_turn("Hi", first=True, reply_ended=False)
    # Only the first turn carries it.
    assert chat.user_turn("More", first=False, reply_ended=True, system="Answer in French.") == chat.user_turn(
        "More", first=False, reply_ended=True
    )


def test_system_prompt_opens_the_first_message_without_a_system_turn():
    chat = format_from_separators({"user_start": "###Human: ", "user_end": "\n", "assistant_start": "###Assistant:"})
    assert chat.user_turn("Hi", first=True, reply_ended=False, system="Be brief.") == (
        "###Human: Be brief.\n\nHi\n###Assistant:"
    )


def test_open_requests_carry_a_system_prompt_and_whole_exchanges():
    request = parse_open(
        {
            "model": "demo",
            "max_length": 64,
            "system_prompt": "Be brief.",
            "history": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        }
    )
    assert request.system_prompt == "Be brief." and request.history == (("Hi", "Hello"),)
    base = {"model": "demo", "max_length": 64}
    for history, problem in [
        ("Hi", "must be a list"),
        ([{"role": "user", "content": "Hi"}], "whole exchanges"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], r"history\[0\]"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}], "must be a string"),
    ]:
        with pytest.raises(PlaygroundError, match=problem):
            parse_open({**base, "history": history})
    with override_settings(PLAYGROUND_MAX_INPUT_CHARS=10):
        long = [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 11}]
        with pytest.raises(LimitExceeded, match="41 characters"):
            parse_open({**base, "history": long})


@override_settings(PLAYGROUND_MAX_NEW_TOKENS=100)
def test_reply_budget_is_the_smallest_limit():
    from playground.budget import reply_budget

    assert reply_budget(None, held=10, session_length=1000) == 100  # the site's cap
    assert reply_budget(500, held=10, session_length=1000) == 100
    assert reply_budget(20, held=10, session_length=1000) == 20
    assert reply_budget(50, held=990, session_length=1000) == 10  # room left in the session
    assert reply_budget(50, held=10, session_length=1000, max_length=15) == 5  # Petals' max_length
    with pytest.raises(BadRequest, match="already has 15 tokens"):
        reply_budget(50, held=15, session_length=1000, max_length=15)
    with pytest.raises(BadRequest, match="this session allows 1000"):
        reply_budget(50, held=1000, session_length=1000)


class _Chat:
    """The parts of a loaded chat model a Conversation uses before anything runs on the swarm."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_format = format_from_template(tokenizer)


def test_resumed_chat_is_the_templates_conversation_and_regenerate_rewinds_to_the_user_message(tokenizer):
    from playground.generation import Conversation, ReplyOptions
    from playground.replies import plan_reply

    conversation = Conversation(_Chat(tokenizer), max_length=512)
    conversation.resume("Be brief.", [("Hi", "Hello there")])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(conversation.ids) == expected

    conversation.chat.spec = type("Spec", (), {"defaults": type("D", (), {"max_new_tokens": 16})})()
    new_ids, options = plan_reply(conversation, parse_generate({"user_message": "And lists?"}))
    prompt = conversation.ids + new_ids
    assert isinstance(options, ReplyOptions) and options.max_new_tokens == 16 and not options.include_stop
    conversation.ids = prompt + [1, 2, 3]  # as if the model replied
    again_ids, _ = plan_reply(conversation, parse_generate({"regenerate": True}))
    assert again_ids == [] and conversation.ids == prompt

    fresh = Conversation(_Chat(tokenizer), max_length=512)
    with pytest.raises(BadRequest, match="no chat reply to regenerate"):
        plan_reply(fresh, parse_generate({"regenerate": True}))
    too_long = Conversation(_Chat(tokenizer), max_length=8)
    assert too_long.resume("", [("Hi " * 10, "Hello")]) == 1 and too_long.ids == []  # left out, not refused


def test_a_resumed_chat_too_long_for_its_session_goes_on_with_its_latest_exchanges(tokenizer):
    from playground.generation import RESUME_ROOM, Conversation

    history = [(f"Question {i}: " + "why " * 15 + "?", f"Answer {i}: " + "because " * 15 + ".") for i in range(20)]
    conversation = Conversation(_Chat(tokenizer), max_length=256)
    dropped = conversation.resume("Be brief.", history)
    assert 0 < dropped < len(history)
    assert len(conversation.ids) <= 256 * (1 - RESUME_ROOM)  # room for the next exchange
    # The latest exchanges, in the template's own form, the system prompt first.
    messages = [{"role": "system", "content": "Be brief."}]
    for user, assistant in history[dropped:]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    assert tokenizer.decode(conversation.ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    # As many as fit: one more exchange would not have.
    assert Conversation(_Chat(tokenizer), max_length=256).resume("Be brief.", history[dropped - 1 :]) == 1


def test_temperature_5_is_refused_by_the_http_api():
    response = Client(HTTP_HOST=HOST).post(
        "/api/v1/generate",
        {"model": "demo", "inputs": "Hi", "max_new_tokens": 4, "temperature": 5, "do_sample": 1},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json() == {"ok": False, "traceback": "`temperature` must be above 0 and at most 2 (got 5)"}


def test_websocket_refuses_temperature_5_with_a_clear_message():
    async def scenario():
        communicator, connected = await _connect()
        assert connected
        try:
            message = {"type": "generate", "user_message": "x", "do_sample": 1, "temperature": 5}
            await communicator.send_to(text_data=json.dumps(message))
            refused = json.loads(await communicator.receive_from())
            await communicator.send_to(text_data=json.dumps({**message, "temperature": 0.7}))
            return refused, json.loads(await communicator.receive_from())
        finally:
            await communicator.disconnect()

    refused, valid = _run(scenario())
    assert refused == {"ok": False, "traceback": "`temperature` must be above 0 and at most 2 (got 5)"}
    assert valid == {
        "ok": False,
        "traceback": 'open a session first: {"type": "open_inference_session", "model", "max_length"}',
    }


def test_chat_page_gets_the_servers_sampling_limits():
    page = Client(HTTP_HOST=HOST).get("/chat/")
    config = json.loads(page.content.decode().split('id="playground-config" type="application/json">')[1].split("<")[0])
    assert config["sampling_limits"]["temperature"] == {"min": 0.0, "max": 2.0, "min_excluded": True}
    assert 'id="system-prompt"' in page.content.decode() and 'id="chat-list"' in page.content.decode()


def test_playground_imports_run_one_way():
    """No import cycle among the playground's modules, even through imports inside functions."""
    import ast
    import graphlib

    from tests.conftest import ROOT

    graph = {}
    for path in (ROOT / "playground").glob("*.py"):
        module = f"playground.{path.stem}"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("playground"):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                imported |= {n for n in names if (ROOT / (n.replace(".", "/") + ".py")).exists()} or {node.module}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("playground.")}
        graph[module] = imported - {module}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
