"""The balancer's HTTP API as types: every request body and every JSON answer.

The balancer's handlers build these, its OpenAPI document is generated from them
(`treewave.balancer.openapi`), and the CLI reads the answers back through them, so the
three cannot drift apart. They live in the core because both shells (the balancer and
the CLI) use them; they hold no behaviour.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from treewave.core.topology import TopologyFile

__all__ = [
    "WAVE_TRACE",
    "AccessError",
    "AccessReason",
    "AdoptResult",
    "ApiError",
    "ClusterStatus",
    "Edge",
    "EmptyRequest",
    "FinnRequest",
    "FinnResult",
    "Health",
    "LiveWave",
    "MigrationStatus",
    "MovedTasks",
    "PageSnapshot",
    "RebalanceResult",
    "RetiredServer",
    "RetiringServer",
    "ServerLine",
    "SessionOpened",
    "SubmitRequest",
    "SubmitResult",
    "SubmitUnconfirmedError",
    "TopologyRefused",
    "TopologyStatus",
    "TopologySummary",
    "TraceDecide",
    "TraceList",
    "TraceListing",
    "TraceMessage",
    "TreeNode",
    "TreeSnapshot",
    "WaveSummary",
    "WaveTrace",
]


AccessReason = Literal["host", "origin", "content_type", "token_missing", "token_wrong"]
"""Why the access rules refused a request (`treewave_api_rejected_total{reason}`)."""


class ApiModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- requests ---------------------------------------------------------------------------------


class FinnRequest(ApiModel):
    """`POST /api/finn`: a Finn wave that gives every server this many tasks."""

    # Strict: `"2"`, `true` or `2.0` for a count is a wrong type, not 2 or 1.
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"tasks_per_node": 2, "duration_s": 1.5}]},
    )
    tasks_per_node: int = Field(default=1, ge=0, le=10_000)
    duration_s: float | None = Field(default=None, gt=0, le=3600)


class SubmitRequest(ApiModel):
    """`POST /api/tasks`: queue `count` new tasks at one server."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"node": "ash", "count": 10, "duration_s": 2.0}]},
    )
    node: str = Field(min_length=1, max_length=63)
    count: int = Field(ge=1, le=100_000)
    duration_s: float | None = Field(default=None, gt=0, le=3600)
    actual_s: float | None = Field(default=None, gt=0, le=3600)
    """Emulation only: how long the tasks really run when the declaration is wrong."""


class EmptyRequest(ApiModel):
    """A body with no fields (`{}` or none at all)."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra={"examples": [{}]})


# --- errors -----------------------------------------------------------------------------------


class ApiError(ApiModel):
    """Every error answer: one line naming the problem; nothing was changed unless said."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"examples": [{"error": "unknown server 'oak'"}]},
    )

    error: str


class AccessError(ApiError):
    """A request refused by the access rules (Host, Origin, Content-Type, token)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "error": "this balancer requires its API token for POST /api/tasks: send "
                    "it as 'Authorization: Bearer <token>'",
                    "reason": "token_missing",
                }
            ]
        },
    )

    reason: AccessReason


class TopologyRefused(ApiError):
    """A posted topology that cannot be used; every problem is named, nothing changed."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "error": "not a valid topology; nothing changed: servers: at least 1",
                    "problems": ["servers: at least 1"],
                }
            ]
        },
    )

    problems: list[str]


class SubmitUnconfirmedError(ApiError):
    """The server did not confirm a submission in time: the tasks may or may not be queued."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "error": "server 'ash' did not confirm the tasks; they may or may not be "
                    "queued there",
                    "node": "ash",
                    "first_task": "t-1a2b3c-7.0",
                    "last_task": "t-1a2b3c-7.9",
                }
            ]
        },
    )

    node: str
    first_task: str
    last_task: str


# --- waves ------------------------------------------------------------------------------------


class WaveSummary(ApiModel):
    """One finished wave."""

    wave_id: str
    algorithm: Literal["echo", "finn"]
    complete: bool
    missing: list[str]
    """Servers that did not take part before the deadline."""
    messages: int
    duration_s: float
    finished_at: float
    """Unix time."""
    trigger: str
    """Who asked: "api", "rebalance" or "status" (the status page's refreshes)."""


class LiveWave(WaveSummary):
    """A wave as the status page lists it: `live` marks the page's own refresh Echoes."""

    live: bool


class Edge(ApiModel):
    source: str
    target: str


class TreeNode(ApiModel):
    """One server in an Echo snapshot."""

    name: str
    cpus: int
    running: int
    queued: int
    completed: int
    reserved: int
    expected_work_s: float
    pressure: float
    """Expected work per CPU, seconds."""
    level: int
    """The colour band: 0 idle, 1-4 increasingly busy, 5 overloaded."""
    echo_parent: str
    """The server's parent in this Echo's spanning tree ("" for the root)."""


class TreeSnapshot(WaveSummary):
    """`GET /api/tree`: an Echo wave and the loads it collected."""

    nodes: list[TreeNode]
    edges: list[Edge]


class FinnResult(WaveSummary):
    """`POST /api/finn`: the wave and the servers that decided (enqueued their share)."""

    decided: list[str]
    tasks_per_node: int


# --- rebalancing and tasks --------------------------------------------------------------------


class MovedTasks(ApiModel):
    source: str
    target: str
    tasks: int


class RebalanceResult(ApiModel):
    """`POST /api/rebalance`: one round (Echo, moves, Echo)."""

    moves: list[MovedTasks]
    """The moves done (tasks actually moved)."""
    planned: list[MovedTasks]
    max_pressure_before: float
    max_pressure_after: float
    expected_makespan_before_s: float
    expected_makespan_after_s: float
    complete: bool
    missing: list[str]


class SubmitResult(ApiModel):
    """`POST /api/tasks`: the tasks are queued and on disk at the server."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "node": "ash",
                    "accepted": 10,
                    "first_task": "t-1a2b3c-7.0",
                    "last_task": "t-1a2b3c-7.9",
                }
            ]
        },
    )

    node: str
    accepted: int
    first_task: str
    last_task: str


# --- topology and migration -------------------------------------------------------------------


class RetiringServer(ApiModel):
    queued: int | None
    """None until the server has reported."""
    running: int | None
    reserved: int | None
    held: bool
    reported: bool
    moved: int
    requeued: int
    grace_left_s: float


class RetiredServer(ApiModel):
    moved: int
    completed: int
    requeued: int


class MigrationStatus(ApiModel):
    """The migration to the desired topology: servers leaving it drain, then retire."""

    state: Literal["steady", "draining"]
    drain_grace_s: float
    retiring: dict[str, RetiringServer]
    retired: dict[str, RetiredServer]
    """A server here and not in the topology may be stopped and its storage removed."""
    releasing: list[str]


class TopologyStatus(ApiModel):
    """`GET /api/topology`: the adopted topology (the topology file's format)."""

    topology: TopologyFile
    migration: MigrationStatus


class AdoptResult(TopologyStatus):
    """`POST /api/topology`: `adopted` is false when it was the current topology."""

    adopted: bool


# --- status -----------------------------------------------------------------------------------


class ServerLine(ApiModel):
    name: str
    cpus: int
    children: list[str]


class TopologySummary(ApiModel):
    root: str
    servers: list[ServerLine]
    edges: list[Edge]
    overload_percent: float
    task_time_s: float


class _StatusFields(ApiModel):
    topology: TopologySummary
    links: dict[str, bool]
    """Whether the balancer's link to each server is up."""
    snapshot: TreeSnapshot | None
    """The last Echo's loads (None before the first)."""
    moves: list[MovedTasks]
    """The last round's moves."""
    last_rebalance_at: float | None
    rebalance_interval_s: float
    wave_deadline_s: float
    in_doubt: int
    """Transfers being resolved."""
    migration: MigrationStatus
    policy: str = "lpt"
    """The balancing policy's name."""


class ClusterStatus(_StatusFields):
    """`GET /api/status`."""

    waves: list[WaveSummary]
    """Recent waves, newest first."""


class PageSnapshot(_StatusFields):
    """The status page's snapshot (`/api/events`' `snapshot` event): the status with the
    page's own refresh Echoes, the refresh interval and the server's clock."""

    waves: list[LiveWave]
    interval_s: float
    server_time: float


class Health(ApiModel):
    """`GET /healthz`."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"examples": [{"status": "ok", "links_up": 10, "servers": 10}]},
    )

    status: Literal["ok"]
    links_up: int
    servers: int


class SessionOpened(ApiModel):
    """`POST /api/session`: the session cookie is set."""

    session: Literal["open"]
    reads_protected: bool


# --- traces -----------------------------------------------------------------------------------


class TraceListing(ApiModel):
    """One traced wave in `GET /api/waves`; `complete`, `missing` and `messages` are
    there once its trace is gathered (`ready`)."""

    wave_id: str
    algorithm: Literal["echo", "finn"]
    trigger: str
    wave_complete: bool
    wave_missing: list[str]
    wave_messages: int
    duration_s: float
    finished_at: float
    ready: bool
    complete: bool | None = None
    missing: list[str] | None = None
    messages: int | None = None


class TraceList(ApiModel):
    """`GET /api/waves`: the traced waves kept, newest first."""

    enabled: bool
    history: int
    sample: float
    waves: list[TraceListing]


class _TraceEntry(ApiModel):
    sent: float | None
    received: float | None
    clock: dict[str, int]
    """The vector clock of the event (the receive's, when received)."""
    step: int
    inc: int | None = None
    ninc: int | None = None


class TraceDecide(_TraceEntry):
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)
    kind: Literal["decide"]
    from_: str = Field(alias="from")
    to: None


class TraceMessage(_TraceEntry):
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)
    kind: Literal["explore", "reply", "finn"]
    from_: str = Field(alias="from")
    to: str
    send_clock: dict[str, int] | None
    send_step: int | None
    tree: bool | None = None
    """Echo: whether the message is a spanning-tree edge."""
    dec: int | None = None
    known_inc: int | None = None
    known_ninc: int | None = None


class WaveTrace(ApiModel):
    """`GET /api/waves/{wave_id}`: the wave message by message, in causal order. Fields
    left out of an answer are left out of its JSON too (dump with `exclude_unset`)."""

    wave_id: str
    algorithm: Literal["echo", "finn"]
    complete: bool
    wave_complete: bool
    missing: list[str]
    wave_missing: list[str]
    truncated: list[str]
    unreceived: int
    unmatched_receives: int
    lanes: list[str]
    messages: int
    steps: int
    events: list[TraceDecide | TraceMessage]
    trigger: str | None = None
    """The balancer's traces (not a simulation's) say who asked for the wave, how long it
    took, when it finished and how many messages the wave itself counted."""
    duration_s: float | None = None
    finished_at: float | None = None
    wave_messages: int | None = None


WAVE_TRACE = TypeAdapter(WaveTrace)
