"""Every message that crosses a process boundary, as a pydantic v2 model.

Each carries ``schema_version`` so fields can be added without breaking readers; readers
ignore unknown fields. Stream entries hold one field, ``data``, with the model as JSON.
"""

from __future__ import annotations

import math
import time
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def now() -> float:
    """Wall-clock seconds since the epoch (the unit of every timestamp on the wire)."""
    return time.time()


class JobState(StrEnum):
    """Life cycle of a job. Terminal states never change again."""

    QUEUED = "queued"
    CLASSIFIED = "classified"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        """True for succeeded, failed, cancelled and expired."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}
)

DEADLINE_EXCEEDED = "deadline exceeded before start"
"""Error of a job ended ``expired`` because it could not start before its deadline."""


class Message(BaseModel):
    """Base of wire messages: tolerant reader, versioned."""

    model_config = ConfigDict(extra="ignore")
    schema_version: int = SCHEMA_VERSION

    def to_fields(self) -> dict[str, str]:
        """Encode as stream-entry fields."""
        return {"data": self.model_dump_json()}

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> Self:
        """Decode stream-entry fields written by :meth:`to_fields` (bytes or str)."""
        raw = fields.get("data", fields.get(b"data"))
        if raw is None:
            raise ValueError("stream entry has no 'data' field")
        return cls.model_validate_json(raw)


class PromptJob(Message):
    """A job as enqueued by the gateway on ``t2i:stream:prompts``."""

    job_id: str
    prompt: str
    seed: int
    n: int = 1
    width: int = 32
    height: int = 32
    slo_ms: int | None = None
    enqueued_at: float = Field(default_factory=now)
    deadline: float | None = None


class ClassifiedJob(PromptJob):
    """A job routed to a tier by the classifier, on ``t2i:stream:tier:{tier}``."""

    tier: int
    predicted_tier: int
    probabilities: list[float] = []
    classified_at: float = Field(default_factory=now)
    policy: str = "fixed"
    cache_neighbor: str | None = Field(
        default=None, description="cached prompt id to resume from (cache tiers); "
        "None: the worker looks up the nearest one itself")
    cache_similarity: float | None = None


class EventKind(StrEnum):
    """Kinds of job events on ``t2i:events:{id}``."""

    STATUS = "status"
    PROGRESS = "progress"


class JobEvent(Message):
    """A status change or a denoising-step progress report of one job."""

    job_id: str
    kind: EventKind
    status: JobState
    step: int | None = None
    total: int | None = None
    tier: int | None = None
    error: str | None = None
    at: float = Field(default_factory=now)


class WorkerHeartbeat(Message):
    """What a live worker reports every heartbeat interval."""

    instance: str
    service: str = "worker"
    tier: int | None = None
    model: str | None = None
    backend: str = ""
    device: str = ""
    busy: bool = False
    plan_version: int = 0
    jobs_done: int = 0
    model_switches: int = 0
    at: float = Field(default_factory=now)


class ServiceHeartbeat(Message):
    """Heartbeat of a headless service other than a worker (classifier, controller...)."""

    instance: str
    service: str
    detail: dict[str, Any] = {}
    at: float = Field(default_factory=now)


class AllocationPlan(Message):
    """A versioned plan: which worker serves which tier, and how to route predictions.

    ``routing[k][j]`` is the probability that a prompt predicted at tier ``k`` is served at
    tier ``j``; a missing row means identity (served at its predicted tier).
    """

    version: int
    policy: str
    created_at: float = Field(default_factory=now)
    assignments: dict[str, int] = {}
    gpus_per_tier: dict[int, int] = {}
    routing: dict[int, dict[int, float]] = {}
    detail: dict[str, Any] = {}


class OverloadEstimate(Message):
    """The controller's overload estimate (``t2i:overload``, kept with a TTL).

    ``delay_s`` is the estimated queueing delay of a job arriving now: the jobs waiting
    ahead of it divided by the cluster's planned service rate.
    """

    overloaded: bool = False
    delay_s: float = 0.0
    unserved: float = 0.0
    capacity: float = 0.0
    at: float = Field(default_factory=now)

    def retry_after(self, limit_s: float) -> int | None:
        """Seconds to put in ``Retry-After`` when a new job must be refused, else None.

        A job is refused only while ``overloaded`` and when ``delay_s`` exceeds
        ``limit_s`` (the request's SLO, or the gateway's default limit); the answer is
        ``ceil(delay_s)``, at least 1.
        """
        if not self.overloaded or self.delay_s <= limit_s:
            return None
        return max(1, math.ceil(self.delay_s))


class ControllerState(Message):
    """What the controller observed and decided in its latest period
    (``t2i:controller:state``): exposed by ``GET /v1/tiers``, and read by the classifier
    for the per-tier queueing delay (deadline handling).

    Rates and capacities are jobs/s; delays seconds; tier ids are keys.
    """

    policy: str
    plan_version: int = 0
    formulation: str | None = None
    workers: int = 0
    gpus_per_tier: dict[int, int] = {}
    capacity: dict[int, float] = {}
    served: dict[int, float] = {}
    unserved: float = 0.0
    arrival_rate: float = 0.0
    forecast: float = 0.0
    demand: float = 0.0
    mix: dict[int, float] = {}
    backlog: dict[int, int] = {}
    prompt_backlog: int = 0
    queue_delay_s: dict[int, float] = {}
    overload: OverloadEstimate = OverloadEstimate()
    solve_ms: float | None = None
    status: str = ""
    detail: dict[str, Any] = {}
    moved: int = 0
    at: float = Field(default_factory=now)
