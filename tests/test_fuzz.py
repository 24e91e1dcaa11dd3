"""Hostile clients: random frames thrown at `/ws` never crash the socket or leak internals.

Property-based (Hypothesis), through the real app in-process with the fake upstream: one app and
one socket take every example. After each random frame the socket must still be open, every reply
to it that is an `error` must carry a `code` and a readable `message` without a traceback or a
server path, and a plain message must still get its whole reply.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from quart import Quart

from chatbot.fake_openai import FakeOpenAI, reply_text
from chatbot.settings import Settings

from .conftest import API_KEY, AppFactory, Socket, text_of

ROOT = Path(__file__).resolve().parents[1]
# What a leaked exception would show: a traceback, a source file, the checkout, the venv.
LEAKS = ("Traceback", 'File "', ".py", str(ROOT), "site-packages", API_KEY)
ERROR_FIELDS = {"type", "code", "message", "id"}
EVENT_TYPES = {"user", "delta", "done", "error", "queued"}
REPLY_TIMEOUT_S = 10.0

# JSON as a client may send it. Strings may hold lone surrogates: `json.dumps` escapes them
# (`"\ud800"`), which is valid UTF-8 on the wire but not encodable back to UTF-8 once parsed.
lone_surrogates = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
any_text = st.text(max_size=40) | st.tuples(
    st.text(max_size=20), lone_surrogates, st.text(max_size=20)
).map("".join)
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
# Long strings without drawing thousands of characters one by one: around MAX_MESSAGE_CHARS.
long_text = st.builds(
    lambda piece, n: (piece * n)[:n], st.text(min_size=1, max_size=3), st.integers(3900, 4100)
)
field_value = json_values | long_text | st.text(max_size=80)
frame_dicts = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["message", "stop", "Message", "", "delta"]) | json_values,
        "id": st.none() | st.text(max_size=70) | json_values,
        "text": field_value,
        "after": json_values,  # a field that belongs elsewhere
    },
)
# Frames that are nearly, or entirely, valid messages: odd text and ids get to the service.
near_messages = st.fixed_dictionaries(
    {"type": st.just("message"), "text": any_text}, optional={"id": any_text}
)
frames = (
    st.text(max_size=200)  # mostly not JSON
    | near_messages.map(json.dumps)
    | json_values.map(json.dumps)
    | frame_dicts.map(json.dumps)
    # Not empty: Quart's test client sends an empty binary frame without the "text" key its
    # receiver reads (a KeyError in Quart itself). tests/test_frame_limits.py sends one for real.
    | st.binary(min_size=1, max_size=200)
)


@pytest.fixture
async def fuzz_app(app_with: AppFactory, fake: FakeOpenAI) -> AsyncIterator[Quart]:
    fake.configure(chunks=3, interval_ms=0)
    settings = Settings(
        openai_base_url=fake.base_url,
        openai_api_key=API_KEY,
        openai_model="test-model",
        rate_limit_session="1000000/minute",  # hundreds of messages in seconds: not the subject
        rate_limit_ip="1000000/minute",
    )
    async with app_with(settings) as app:
        yield app


@pytest.fixture
async def ws(fuzz_app: Quart) -> AsyncIterator[Socket]:
    async with fuzz_app.test_client().websocket("/ws") as raw:
        socket = Socket(raw)
        assert (await socket.recv())["type"] == "ready"
        yield socket


_sentinels = itertools.count()


def check_error(frame: dict[str, Any], sent: str | bytes) -> None:
    """A per-socket error: a code, a readable message, nothing internal."""
    assert set(frame) <= ERROR_FIELDS, frame
    assert isinstance(frame["code"], str) and frame["code"], frame
    message = frame["message"]
    assert isinstance(message, str) and message.strip(), frame
    assert len(message) < 500, frame
    echoed = sent if isinstance(sent, str) else sent.decode("latin-1")
    for leak in LEAKS:
        assert leak not in message or leak in echoed, (leak, frame)


@hypothesis_settings(
    max_examples=200,
    deadline=None,
    database=None,  # never write .hypothesis/ into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frame=frames)
@example(frame=json.dumps({"type": "message", "text": "\ud800 a lone surrogate"}))
@example(frame=json.dumps({"type": "message", "id": "\udfff", "text": "hi"}))
async def test_random_frames_never_break_the_socket(ws: Socket, frame: str | bytes) -> None:
    # A sentinel after the frame marks where the answers to it end: a bad-JSON error echoes it.
    sentinel = f"#sentinel-{next(_sentinels)}"
    await ws.send(frame)
    await ws.send(sentinel)
    answers = await ws.until(lambda f: f["type"] == "error" and sentinel in f["message"])
    for answer in answers[:-1]:
        assert answer["type"] in EVENT_TYPES, answer
        # The test client hands frames over as str; a real server must encode them as UTF-8, and
        # one that cannot be (a lone surrogate) kills the socket: 1011.
        json.dumps(answer, ensure_ascii=False).encode()
        if answer["type"] == "error" and "seq" not in answer:
            check_error(answer, frame)
    # The frame may have been a valid message: let its reply end before the next example.
    started = {a["id"] for a in answers if a["type"] == "user"}
    ended = {a["reply_to"] for a in answers if a["type"] == "done"}
    if started - ended:
        rest = await ws.until(lambda f: f["type"] == "done", REPLY_TIMEOUT_S)
        assert rest[-1]["reply_to"] in started - ended
        answers += rest
    for event in answers:
        if event["type"] == "error" and "seq" in event:  # a failed reply, logged
            check_error({k: v for k, v in event.items() if k not in ("seq", "reply_to")}, frame)

    # And the socket still chats.
    await ws.send({"type": "message", "text": "hi"})
    reply = await ws.until_done(REPLY_TIMEOUT_S)
    types = [f["type"] for f in reply]
    assert types[0] == "user" and set(types[1:-1]) == {"delta"} and types[-1] == "done", reply
    assert reply[-1]["reason"] == "stop"
    assert text_of(reply) == reply_text("hi", 3)


@pytest.mark.parametrize("path", ["/chat", "/api/ask"])
async def test_http_refuses_a_lone_surrogate_before_it_reaches_a_session(
    fuzz_app: Quart, fake: FakeOpenAI, path: str
) -> None:
    body = '{"message": "half a pair: \\ud800"}'
    headers = {"Content-Type": "application/json"}
    response = await fuzz_app.test_client().post(path, data=body, headers=headers)
    assert response.status_code == 400
    assert "Unicode" in (await response.get_json())["error"]
    assert fake.requests == []
