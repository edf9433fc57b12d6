"""Every message that crosses a WebSocket, as frozen pydantic models in one tagged union.

`parse_message` is the single way in: it validates JSON text (or a dict) against the union
and raises `RemoteProtocolError` naming what was wrong. Models are frozen and forbid
unknown keys, so a message is either entirely valid or rejected.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from treewave.core.errors import RemoteProtocolError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_PARTS_PER_FRAME",
    "TRACE_ROW_FIELDS",
    "Challenge",
    "DrainReport",
    "DrainRequest",
    "EchoExplore",
    "EchoReply",
    "ErrorReply",
    "FinnSets",
    "FinnWork",
    "Hello",
    "Message",
    "Model",
    "ReservationInfo",
    "ServerState",
    "SubmitTasks",
    "Task",
    "TasksAccepted",
    "TraceEvent",
    "TracePart",
    "TraceParts",
    "TraceRequest",
    "TraceRow",
    "TransferAbort",
    "TransferCancel",
    "TransferCommit",
    "TransferDeliver",
    "TransferOutcome",
    "TransferPrepare",
    "TransferPrepared",
    "TransferQuery",
    "TransferReservations",
    "TransferSettled",
    "WaveMessage",
    "describe_errors",
    "encode",
    "parse_message",
    "rows_to_events",
    "trusted",
    "trusted_copy",
]

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest frame accepted; an Echo reply carries the whole tree's state (about 200 bytes
per server), so this allows some 40,000 servers per deployment."""

MAX_PARTS_PER_FRAME = 1_000
"""Most trace parts one `trace.parts` frame carries (a server starts another past it)."""

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
WaveId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
TransferId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
TaskId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,80}$")]
Count = Annotated[int, Field(ge=0, le=1_000_000)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerState(Model):
    """One server's load as reported in an Echo reply."""

    name: Name
    cpus: int = Field(ge=1)
    running: Count
    queued: Count
    completed: Count
    reserved: Count = 0
    parents: tuple[Name, ...] = ()
    children: tuple[Name, ...] = ()
    echo_parent: str = ""
    """Who this server took as its parent in this Echo wave (the spanning-tree edge)."""
    running_left_s: tuple[Annotated[float, Field(ge=0, le=3600)], ...] = Field(
        default=(), max_length=100_000
    )
    """Expected seconds left of each running task (empty from servers that predate it)."""
    queued_s: tuple[tuple[Annotated[float, Field(gt=0, le=3600)], Count], ...] = Field(
        default=(), max_length=1024
    )
    """The queue as (expected duration, count) pairs, longest first (see
    `core.load.duration_histogram`; empty from servers that predate it)."""

    @property
    def load(self) -> int:
        return self.running + self.queued

    @property
    def neighbours(self) -> tuple[str, ...]:
        return self.parents + self.children


class Task(Model):
    """One unit of emulated decoding work; it holds one CPU slot for `duration_s`."""

    id: TaskId
    duration_s: float = Field(gt=0, le=3600)
    """The declared (expected) duration: what balancing plans with."""
    actual_s: float | None = Field(default=None, gt=0, le=3600)
    """Emulation only: how long the task really holds its slot when that differs from the
    declaration (benchmarks of wrong declarations); never read by the policy."""

    @property
    def run_s(self) -> float:
        return self.duration_s if self.actual_s is None else self.actual_s


class FinnWork(Model):
    """What every server does when it decides in a Finn wave: enqueue this many tasks."""

    tasks_per_node: int = Field(default=1, ge=0, le=10_000)
    duration_s: float | None = Field(default=None, gt=0, le=3600)


# --- links ---------------------------------------------------------------------------------


class Challenge(Model):
    """Acceptor -> dialer, first frame on a link when the deployment has a secret: a fresh
    nonce the dialer's hello must answer, so a recorded hello cannot be replayed."""

    type: Literal["challenge"] = "challenge"
    nonce: str = Field(pattern=r"^[0-9a-f]{32,128}$")


class Hello(Model):
    """Dialer -> acceptor, first frame from the dialer: who is speaking (checked against the
    topology) and `token`, its answer to the challenge (HMAC of the secret over the nonce,
    sender and receiver; empty when the deployment has no secret)."""

    type: Literal["hello"] = "hello"
    sender: str = Field(min_length=1, max_length=63)
    token: str = Field(default="", max_length=128)


class ErrorReply(Model):
    """Sent back when a frame is rejected; never answered in turn."""

    type: Literal["error"] = "error"
    error: str = Field(max_length=2000)


# --- waves ---------------------------------------------------------------------------------


class EchoExplore(Model):
    type: Literal["echo.explore"] = "echo.explore"
    wave: WaveId
    sender: Name
    budget_s: float = Field(gt=0, le=3600)
    """Seconds the receiver may wait for its neighbours before answering with what it has."""
    hop_s: float = Field(default=0.0, ge=0, le=3600)
    """How much shorter each next hop's budget is, so deadlines nest down the tree (a
    child gives up before its parent) without starving deep chains."""


class EchoReply(Model):
    type: Literal["echo.reply"] = "echo.reply"
    wave: WaveId
    sender: Name
    states: tuple[ServerState, ...]
    """The sender's subtree (itself first)."""
    sent: int = Field(ge=1)
    """Wave messages sent inside the sender's subtree, this reply included."""


class FinnSets(Model):
    type: Literal["finn"] = "finn"
    wave: WaveId
    sender: Name
    inc: frozenset[str]
    ninc: frozenset[str]
    dec: dict[str, int]
    """Servers known to have decided, each with the wave messages it sent in all."""
    work: FinnWork
    budget_s: float = Field(gt=0, le=3600)
    expires_at: float | None = None
    """Wall-clock time (Unix seconds) after which a server must not act on the wave: a
    server frozen past the balancer's deadline then never does work the balancer already
    reported as not done (set by the balancer; clocks are assumed roughly in sync)."""


# --- traces (balancer <-> server, after a wave, on the direct link) --------------------------


class TraceEvent(Model):
    """One thing a participant did in a wave, as it recorded it: sent or received a wave
    message, or decided. `seq` orders a participant's own events; `at` is its own wall
    clock (hosts' clocks may disagree: causality comes from matching, not from `at`)."""

    seq: int = Field(ge=0)
    event: Literal["send", "receive", "decide"]
    message: Literal["explore", "reply", "finn", ""] = ""
    """The wave message's kind (empty for a decision)."""
    peer: str = Field(default="", max_length=63)
    """The receiver of a send, the sender of a receive."""
    at: float
    inc: int | None = Field(default=None, ge=0)
    """Finn: sizes of the sets the message carried (or, for a decision, of the decider's)."""
    ninc: int | None = Field(default=None, ge=0)
    dec: int | None = Field(default=None, ge=0)
    known_inc: int | None = Field(default=None, ge=0)
    """Finn, on a receive: the receiver's own `inc` and `ninc` sizes after merging."""
    known_ninc: int | None = Field(default=None, ge=0)


SetSize = Annotated[int, Field(ge=0)] | None

TraceRow = tuple[
    Literal["send", "receive", "decide"],
    Literal["explore", "reply", "finn", ""],
    Annotated[str, Field(max_length=63)],
    float,
    SetSize,
    SetSize,
    SetSize,
    SetSize,
    SetSize,
]
"""A `TraceEvent` as a part carries it: its fields in order (`event`, `message`, `peer`,
`at`, `inc`, `ninc`, `dec`, `known_inc`, `known_ninc`), its `seq` its place in the part.
A JSON array per event is half the bytes of an object, and a tuple of plain values is
validated without building a model per event (a 100-server wave's parts: 400 events)."""

TRACE_ROW_FIELDS = (
    "event", "message", "peer", "at", "inc", "ninc", "dec", "known_inc", "known_ninc",
)  # fmt: skip


class TraceRequest(Model):
    """Balancer -> server: send me your part of this wave's trace."""

    type: Literal["trace.request"] = "trace.request"
    wave: WaveId


class TracePart(Model):
    """Server -> balancer: what this server recorded of the wave (possibly nothing: it
    never heard of it, or it has been pushed out of the server's bounded buffer); pushed
    unasked when the server is done with the wave, or as the answer to a request."""

    type: Literal["trace.part"] = "trace.part"
    wave: WaveId
    server: Name
    rows: tuple[TraceRow, ...] = Field(max_length=100_000)
    """The server's events of the wave, in its own order (`TraceRow`)."""
    truncated: bool = False
    """The server hit its per-wave event limit and dropped the rest."""
    pushed: bool = False
    """Sent unasked, when the server finished its part of the wave (or recorded more of it
    after that), rather than as the answer to a `trace.request`."""

    @property
    def events(self) -> tuple[TraceEvent, ...]:
        """The rows as events (built, not validated again: the rows were)."""
        return rows_to_events(self.rows)


def rows_to_events(rows: tuple[TraceRow, ...] | list[TraceRow]) -> tuple[TraceEvent, ...]:
    return tuple(
        trusted(TraceEvent, seq=i, **dict(zip(TRACE_ROW_FIELDS, row, strict=True)))
        for i, row in enumerate(rows)
    )


class TraceParts(Model):
    """Server -> balancer: several pushed parts in one frame (the waves a server finished
    within one push window: back-to-back waves share a frame)."""

    type: Literal["trace.parts"] = "trace.parts"
    parts: tuple[TracePart, ...] = Field(min_length=1, max_length=MAX_PARTS_PER_FRAME)


# --- tasks and transfers (balancer <-> server) ----------------------------------------------


class SubmitTasks(Model):
    type: Literal["tasks.submit"] = "tasks.submit"
    tasks: tuple[Task, ...] = Field(max_length=100_000)


class TasksAccepted(Model):
    """Server -> balancer: a `tasks.submit` (named by its first task id) is queued and on
    disk; `added` of its tasks were new (a repeated submission adds none)."""

    type: Literal["tasks.accepted"] = "tasks.accepted"
    first: TaskId
    added: Count


class TransferPrepare(Model):
    """Balancer -> donor: reserve up to `count` queued tasks for `target`: the last
    `count` in run order, or, when `durations` is given, for each listed duration the
    queued task whose expected duration is closest to it (see `TaskLedger.prepare`)."""

    type: Literal["transfer.prepare"] = "transfer.prepare"
    transfer: TransferId
    target: Name
    count: int = Field(ge=1, le=100_000)
    durations: tuple[Annotated[float, Field(gt=0, le=3600)], ...] | None = Field(
        default=None, max_length=100_000
    )

    @model_validator(mode="after")
    def _count_matches(self) -> TransferPrepare:
        if self.durations is not None and len(self.durations) != self.count:
            raise ValueError(f"count {self.count} but {len(self.durations)} durations")
        return self


class TransferPrepared(Model):
    """Donor -> balancer: the tasks now reserved (possibly none)."""

    type: Literal["transfer.prepared"] = "transfer.prepared"
    transfer: TransferId
    tasks: tuple[Task, ...]


class TransferDeliver(Model):
    """Balancer -> recipient: enqueue these tasks, idempotently by transfer id."""

    type: Literal["transfer.deliver"] = "transfer.deliver"
    transfer: TransferId
    source: Name
    tasks: tuple[Task, ...]


class TransferCancel(Model):
    """Balancer -> recipient: refuse this transfer from now on, unless already accepted."""

    type: Literal["transfer.cancel"] = "transfer.cancel"
    transfer: TransferId


class TransferOutcome(Model):
    """Recipient -> balancer: `accepted` (tasks are queued here) or `cancelled` (never)."""

    type: Literal["transfer.outcome"] = "transfer.outcome"
    transfer: TransferId
    outcome: Literal["accepted", "cancelled"]


class TransferCommit(Model):
    """Balancer -> donor: the recipient has the tasks; drop the reservation."""

    type: Literal["transfer.commit"] = "transfer.commit"
    transfer: TransferId


class TransferAbort(Model):
    """Balancer -> donor: the recipient never got them; requeue the reservation."""

    type: Literal["transfer.abort"] = "transfer.abort"
    transfer: TransferId


class TransferSettled(Model):
    """Donor -> balancer: the reservation is resolved (committed or aborted)."""

    type: Literal["transfer.settled"] = "transfer.settled"
    transfer: TransferId
    outcome: Literal["committed", "aborted", "unknown"]


class TransferQuery(Model):
    """Balancer -> server: which reservations do you hold? (after the balancer restarts
    or a link comes back, so no reservation stays in doubt forever)."""

    type: Literal["transfer.query"] = "transfer.query"


class ReservationInfo(Model):
    transfer: TransferId
    target: Name
    tasks: int = Field(ge=0)


class TransferReservations(Model):
    """Server -> balancer: the reservations it holds."""

    type: Literal["transfer.reservations"] = "transfer.reservations"
    reservations: tuple[ReservationInfo, ...] = Field(max_length=100_000)


# --- topology change (balancer <-> a server leaving the topology) ---------------------------


class DrainRequest(Model):
    """Balancer -> a server leaving the topology (or coming back into it).

    `hold=True`: from now on the server starts no queued task and takes no new work
    (submissions are refused, deliveries cancelled, waves refused), so what it holds can
    only shrink; it is persisted, so a restart keeps it. `requeue_running` (only with the
    hold, once `drain_grace_s` has passed) also stops every running task and queues it
    again from scratch, as after a crash. `hold=False` lifts the hold. Idempotent; always
    answered with a `DrainReport`, so the balancer also polls a retiring server with it.
    `seq` numbers the request (growing per balancer); the report echoes it, so the
    balancer can tell the answer to its latest request from an older one still under way.
    """

    type: Literal["server.drain"] = "server.drain"
    hold: bool
    requeue_running: bool = False
    seq: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _requeue_needs_hold(self) -> DrainRequest:
        if self.requeue_running and not self.hold:
            raise ValueError("requeue_running needs hold (a requeued task would start again)")
        return self


class DrainReport(Model):
    """Server -> balancer: the answer to a `DrainRequest`, after it took effect (and is on
    disk): whether it holds, and what it still holds."""

    type: Literal["server.drain_report"] = "server.drain_report"
    held: bool
    queued: Count
    running: Count
    reserved: Count
    completed: int = Field(ge=0)
    transferred_out: int = Field(ge=0)
    """Cumulative counters: the balancer measures what a drain moved from their growth."""
    requeued: Count = 0
    """Running tasks this request stopped and queued again."""
    answers: int = Field(default=0, ge=0)
    """The `seq` of the request this answers."""


Message = Annotated[
    Challenge
    | Hello
    | ErrorReply
    | EchoExplore
    | EchoReply
    | FinnSets
    | SubmitTasks
    | TasksAccepted
    | TransferPrepare
    | TransferPrepared
    | TransferDeliver
    | TransferCancel
    | TransferOutcome
    | TransferCommit
    | TransferAbort
    | TransferSettled
    | TransferQuery
    | TransferReservations
    | TraceRequest
    | TracePart
    | TraceParts
    | DrainRequest
    | DrainReport,
    Field(discriminator="type"),
]
WaveMessage = EchoExplore | EchoReply | FinnSets

MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def parse_message(raw: str | bytes | dict[str, Any]) -> Message:
    """Validate one frame; raises `RemoteProtocolError` saying what is wrong with it."""
    if isinstance(raw, (str, bytes)) and _size(raw) > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError(
            f"message too large: {_size(raw)} bytes (limit {MAX_MESSAGE_BYTES})", reason="too_large"
        )
    try:
        if isinstance(raw, dict):
            return MESSAGE_ADAPTER.validate_python(raw)
        return MESSAGE_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise RemoteProtocolError(
            "invalid message: " + describe_errors(exc), reason=_reason(exc)
        ) from None


M = TypeVar("M", bound=BaseModel)

_FIELDS: dict[type[BaseModel], tuple[dict[str, Any], frozenset[str], frozenset[str]]] = {}
_setattr = object.__setattr__
_REQUIRED = object()


def _fields_of(cls: type[BaseModel]) -> tuple[dict[str, Any], frozenset[str], frozenset[str]]:
    """(every field in order with its default, every field name, the required ones) of a
    model class, cached. Values are kept in field order: the JSON follows it."""
    known = _FIELDS.get(cls)
    if known is None:
        fields = cls.model_fields
        template = {
            name: _REQUIRED if f.is_required() else f.get_default(call_default_factory=True)
            for name, f in fields.items()
        }
        required = frozenset(n for n, f in fields.items() if f.is_required())
        known = _FIELDS[cls] = (template, frozenset(fields), required)
    return known


def trusted(cls: type[M], **fields: Any) -> M:
    """A message the core builds from values it already holds, without validating them
    again. Validation is for what arrives; what a state machine sends is made of what it
    validated on the way in, and validating it again copies every set and every nested
    state (a Finn message with 20-name sets: 13.5 us validated, 1.6 us built here; an Echo
    reply re-checks each state of its subtree). Unknown or missing fields are refused."""
    template, names, required = _fields_of(cls)
    if not names.issuperset(fields) or not required.issubset(fields):
        unknown = sorted(fields.keys() - names)
        missing = sorted(required - fields.keys())
        raise TypeError(f"{cls.__name__}: unknown fields {unknown}, missing fields {missing}")
    model = cls.__new__(cls)
    _setattr(model, "__dict__", {**template, **fields})
    _setattr(model, "__pydantic_fields_set__", set(fields))
    _setattr(model, "__pydantic_extra__", None)
    _setattr(model, "__pydantic_private__", None)
    return model


def trusted_copy(model: M, **update: Any) -> M:
    """`model` with some fields replaced, like `model_copy(update=...)`, for the same
    reason as `trusted`."""
    cls = type(model)
    if not _fields_of(cls)[1].issuperset(update):
        raise TypeError(f"{cls.__name__}: unknown fields {sorted(update)}")
    copy = cls.__new__(cls)
    _setattr(copy, "__dict__", {**model.__dict__, **update})
    _setattr(copy, "__pydantic_fields_set__", model.__pydantic_fields_set__ | update.keys())
    _setattr(copy, "__pydantic_extra__", None)
    _setattr(copy, "__pydantic_private__", None)
    return copy


def _size(raw: str | bytes) -> int:
    """Size in UTF-8 bytes; a str is only encoded when its characters could exceed the limit."""
    if isinstance(raw, bytes) or len(raw) * 4 <= MAX_MESSAGE_BYTES:
        return len(raw)
    return len(raw.encode("utf-8", "surrogatepass"))


def encode(message: Model) -> str:
    return message.model_dump_json()


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "message"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _reason(exc: ValidationError) -> str:
    types = {e["type"] for e in exc.errors()}
    if "json_invalid" in types or "json_type" in types:
        return "malformed_json"
    if types & {"union_tag_invalid", "union_tag_not_found", "model_attributes_type"}:
        return "unknown_type"
    return "invalid_fields"
