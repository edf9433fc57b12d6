"""Wire messages: every type round-trips; anything malformed is a RemoteProtocolError."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from treewave.core import messages as m
from treewave.core.errors import RemoteProtocolError
from treewave.core.load import pressure

STATE = m.ServerState(
    name="alpha",
    cpus=2,
    running=1,
    queued=3,
    completed=7,
    reserved=1,
    parents=("root",),
    children=("beta", "gamma"),
    echo_parent="root",
)
TASK = m.Task(id="job-1:part.2", duration_s=1.5)

EXAMPLES: list[m.Model] = [
    m.Hello(sender="alpha", token="s3cret"),
    m.ErrorReply(error="bad frame"),
    m.EchoExplore(wave="echo-1", sender="balancer", budget_s=4.0),
    m.EchoReply(wave="echo-1", sender="alpha", states=(STATE,), sent=3),
    m.FinnSets(
        wave="finn.7",
        sender="alpha",
        inc=frozenset({"balancer", "root", "alpha"}),
        ninc=frozenset({"balancer", "root"}),
        dec={"balancer": 1, "root": 2},
        work=m.FinnWork(tasks_per_node=2, duration_s=0.5),
        budget_s=5.0,
    ),
    m.SubmitTasks(tasks=(TASK, m.Task(id="t2", duration_s=3))),
    m.TransferPrepare(transfer="tr-1", target="beta", count=2),
    m.TransferPrepared(transfer="tr-1", tasks=(TASK,)),
    m.TransferDeliver(transfer="tr-1", source="alpha", tasks=(TASK,)),
    m.TransferCancel(transfer="tr-1"),
    m.TransferOutcome(transfer="tr-1", outcome="accepted"),
    m.TransferCommit(transfer="tr-1"),
    m.TransferAbort(transfer="tr-1"),
    m.TransferSettled(transfer="tr-1", outcome="aborted"),
    m.TasksAccepted(first="job-1:part.2", added=2),
    m.TransferQuery(),
    m.TransferReservations(
        reservations=(m.ReservationInfo(transfer="tr-1", target="beta", tasks=2),)
    ),
    m.Challenge(nonce="0123456789abcdef0123456789abcdef"),
    m.DrainRequest(hold=True, requeue_running=True),
    m.DrainReport(
        held=True, queued=3, running=0, reserved=1, completed=7, transferred_out=2, requeued=2
    ),
    m.TraceRequest(wave="echo-1"),
    m.TracePart(
        wave="finn-1",
        server="beta",
        rows=(
            ("receive", "finn", "alpha", 1.5, 2, None, None, None, None),
            ("decide", "", "", 1.6, 3, 3, None, None, None),
        ),
    ),
    m.TraceParts(
        parts=(
            m.TracePart(wave="echo-1", server="beta", rows=(), pushed=True),
            m.TracePart(
                wave="echo-2",
                server="beta",
                rows=(("send", "reply", "alpha", 2.0, None, None, None, None, None),),
                pushed=True,
            ),
        )
    ),
]
"""One example of every message type; `test_examples_cover_every_message_type` fails
when a type is added to the union without one here."""


def example_id(msg: m.Model) -> str:
    return type(msg).__name__


def test_examples_cover_every_message_type() -> None:
    union_types = {t.__name__ for t in m.Message.__origin__.__args__}  # type: ignore[attr-defined]
    assert {type(x).__name__ for x in EXAMPLES} == union_types
    tags = [x.type for x in EXAMPLES]  # type: ignore[attr-defined]
    assert len(set(tags)) == len(tags)


@pytest.mark.parametrize("msg", EXAMPLES, ids=example_id)
def test_round_trip_json_text(msg: m.Model) -> None:
    text = m.encode(msg)
    back = m.parse_message(text)
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("msg", EXAMPLES, ids=example_id)
def test_round_trip_bytes_and_dict(msg: m.Model) -> None:
    assert m.parse_message(m.encode(msg).encode()) == msg
    assert m.parse_message(json.loads(m.encode(msg))) == msg
    assert m.parse_message(msg.model_dump(mode="json")) == msg


@pytest.mark.parametrize("msg", EXAMPLES, ids=example_id)
def test_models_are_frozen(msg: m.Model) -> None:
    field = next(iter(type(msg).model_fields))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(msg, field, getattr(msg, field))


def test_nested_models_are_frozen() -> None:
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        STATE.queued = 0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        TASK.duration_s = 9  # type: ignore[misc]


def test_server_state_derived_values() -> None:
    assert STATE.load == 4
    # Pressure is core.load.pressure (expected work per CPU); STATE reports no work, so
    # each of its 4 tasks counts for task_time_s.
    assert pressure(STATE, task_time_s=0.5) == 1.0
    assert STATE.neighbours == ("root", "beta", "gamma")


def rejected(raw: str | bytes | dict[str, Any]) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        m.parse_message(raw)
    return info.value


@pytest.mark.parametrize(
    "raw", ["{", "", "not json", '{"type": "hello",}', b"\xff\xfe", "[" * 5000]
)
def test_malformed_json(raw: str | bytes) -> None:
    err = rejected(raw)
    assert err.reason == "malformed_json"
    assert str(err).startswith("invalid message: ")
    assert "JSON" in str(err)


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "echo.teleport", "wave": "w"}',
        '{"type": 5}',
        '{"wave": "w", "sender": "alpha"}',
        {"type": "rreq", "sender": "alpha"},
    ],
)
def test_unknown_or_missing_type(raw: str | dict[str, Any]) -> None:
    err = rejected(raw)
    assert err.reason == "unknown_type"
    assert "tag" in str(err)


def test_unknown_type_names_the_tag() -> None:
    assert "'echo.teleport'" in str(rejected('{"type": "echo.teleport"}'))


@pytest.mark.parametrize("msg", EXAMPLES, ids=example_id)
def test_unknown_field(msg: m.Model) -> None:
    data = msg.model_dump(mode="json")
    data["colour"] = "red"
    err = rejected(json.dumps(data))
    assert err.reason == "invalid_fields"
    assert f"{data['type']}.colour: unknown field" in str(err)


def test_unknown_nested_field() -> None:
    data = EXAMPLES[3].model_dump(mode="json")
    data["states"][0]["mood"] = "happy"
    err = rejected(data)
    assert err.reason == "invalid_fields"
    assert "echo.reply.states.0.mood: unknown field" in str(err)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"type": "echo.explore", "wave": "w", "sender": "a", "budget_s": "soon"}, "budget_s"),
        ({"type": "echo.explore", "wave": "w", "sender": "a", "budget_s": 0}, "budget_s"),
        ({"type": "echo.explore", "wave": "w", "sender": "Alpha", "budget_s": 1}, "sender"),
        ({"type": "echo.explore", "wave": "w" * 65, "sender": "a", "budget_s": 1}, "wave"),
        ({"type": "echo.explore", "wave": "w w", "sender": "a", "budget_s": 1}, "wave"),
        ({"type": "echo.explore", "sender": "a", "budget_s": 1}, "wave"),
        ({"type": "echo.reply", "wave": "w", "sender": "a", "states": [], "sent": 0}, "sent"),
        ({"type": "echo.reply", "wave": "w", "sender": "a", "states": "all", "sent": 1}, "states"),
        ({"type": "tasks.submit", "tasks": [{"id": "t", "duration_s": -1}]}, "duration_s"),
        ({"type": "tasks.submit", "tasks": [{"id": "bad id", "duration_s": 1}]}, "id"),
        ({"type": "transfer.prepare", "transfer": "t", "target": "b", "count": 0}, "count"),
        ({"type": "transfer.outcome", "transfer": "t", "outcome": "maybe"}, "outcome"),
        ({"type": "challenge", "nonce": "not hex"}, "nonce"),
        ({"type": "hello", "sender": ""}, "sender"),
        ({"type": "finn", "wave": "w", "sender": "a", "inc": "a", "ninc": [], "dec": {},
          "work": {}, "budget_s": 1}, "inc"),
        ({"type": "finn", "wave": "w", "sender": "a", "inc": [], "ninc": [], "dec": {"a": "x"},
          "work": {}, "budget_s": 1}, "dec"),
        ({"type": "finn", "wave": "w", "sender": "a", "inc": [], "ninc": [], "dec": {},
          "work": {"tasks_per_node": -1}, "budget_s": 1}, "tasks_per_node"),
    ],
)  # fmt: skip
def test_wrong_field_types_and_values(data: dict[str, Any], where: str) -> None:
    for raw in (data, json.dumps(data)):
        err = rejected(raw)
        assert err.reason == "invalid_fields"
        assert f"{data['type']}." in str(err)
        assert where in str(err)


def test_many_errors_are_summarised() -> None:
    data = {"type": "transfer.prepare", "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}
    text = str(rejected(data))
    assert "and " in text
    assert "more" in text


def test_oversized_frame() -> None:
    huge = '{"type": "error", "error": "' + "x" * m.MAX_MESSAGE_BYTES + '"}'
    for raw in (huge, huge.encode()):
        err = rejected(raw)
        assert err.reason == "too_large"
        assert "too large" in str(err)
        assert str(m.MAX_MESSAGE_BYTES) in str(err)


def test_oversized_counts_utf8_bytes_not_characters() -> None:
    # Fewer characters than the limit, but more bytes once encoded.
    chars = m.MAX_MESSAGE_BYTES // 2
    raw = '{"type": "error", "error": "' + "é" * chars + '"}'
    assert len(raw) < m.MAX_MESSAGE_BYTES < len(raw.encode())
    assert rejected(raw).reason == "too_large"


def test_frame_at_the_limit_is_parsed_not_rejected_for_size() -> None:
    prefix, suffix = '{"type": "error", "error": "', '"}'
    raw = prefix + "x" * (m.MAX_MESSAGE_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(raw) == m.MAX_MESSAGE_BYTES
    err = rejected(raw)  # the error text is too long for ErrorReply, but size is fine
    assert err.reason == "invalid_fields"


def test_requeue_without_the_hold_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="requeue_running needs hold"):
        m.parse_message('{"type": "server.drain", "hold": false, "requeue_running": true}')


@pytest.mark.parametrize("msg", EXAMPLES, ids=example_id)
def test_trusted_build_equals_the_validated_message(msg: m.Model) -> None:
    # What the core sends unvalidated is the same message, field for field and on the wire.
    given = {name: getattr(msg, name) for name in msg.model_fields_set}
    built = m.trusted(type(msg), **given)
    assert built == msg
    assert m.parse_message(m.encode(built)) == msg
    assert list(built.__dict__) == list(type(msg).model_fields)  # the JSON's key order
    assert built.model_fields_set == msg.model_fields_set
    field = next(iter(type(msg).model_fields))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(built, field, getattr(msg, field))  # frozen like any other


def test_trusted_copy_equals_model_copy() -> None:
    copy = m.trusted_copy(STATE, echo_parent="beta", queued=0)
    assert copy == STATE.model_copy(update={"echo_parent": "beta", "queued": 0})
    assert STATE.echo_parent == "root"  # the original is untouched
    assert copy.model_fields_set == STATE.model_fields_set | {"queued"}


def test_trusted_refuses_unknown_fields() -> None:
    with pytest.raises(
        TypeError, match=r"EchoExplore: unknown fields \['budget'\], missing fields \['budget_s'\]"
    ):
        m.trusted(m.EchoExplore, wave="w", sender="a", budget=1.0)
    with pytest.raises(TypeError, match=r"ServerState: unknown fields \['parent'\]"):
        m.trusted_copy(STATE, parent="x")
