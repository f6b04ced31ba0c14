"""HTTP request and response models of the gateway (the public API, with OpenAPI examples).

Wire messages between services live in :mod:`common.messages`; these models are only the
HTTP surface. Checks that depend on settings (prompt length, allowed sizes) are made in
:mod:`services.gateway.service`, so the limits can change without a code change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from common.messages import AllocationPlan, ControllerState

MAX_IMAGES = 4
MAX_SEED = 2**31 - 1


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be empty or whitespace only")
    return value


class JobCreateRequest(BaseModel):
    """Body of ``POST /v1/jobs``. Unknown fields are rejected (422), to catch typos."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red circle above a blue square",
                    "seed": 7,
                    "n": 1,
                    "size": "32x32",
                    "slo_ms": 5000,
                },
            ]
        },
    )

    prompt: str = Field(description="Text prompt; not blank, at most T2I_MAX_PROMPT_CHARS.")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Noise seed; random (31-bit) when omitted."
    )
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Images to generate (1..4).")
    size: str | None = Field(
        default=None, description="'WxH' from T2I_ALLOWED_SIZES; T2I_DEFAULT_SIZE when omitted."
    )
    slo_ms: int | None = Field(
        default=None, gt=0, description="Latency objective; sets the job's deadline."
    )
    callback_url: HttpUrl | None = Field(
        default=None, description="POSTed the final job state (webhook)."
    )

    _prompt_not_blank = field_validator("prompt")(_not_blank)


class JobCreated(BaseModel):
    """Answer of ``POST /v1/jobs`` (202): the job id and where to follow it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2c0d7e9b5a4c1e8d6f0a2b4c6e8f10",
                    "status": "queued",
                    "status_url": "http://127.0.0.1:8000/v1/jobs/3f2c0d7e9b5a4c1e8d6f0a2b4c6e8f10",
                    "result_url": "http://127.0.0.1:8000/v1/jobs/3f2c0d7e9b5a4c1e8d6f0a2b4c6e8f10/image",
                    "cancel_url": "http://127.0.0.1:8000/v1/jobs/3f2c0d7e9b5a4c1e8d6f0a2b4c6e8f10/cancel",
                }
            ]
        }
    )

    id: str
    status: str
    status_url: str
    result_url: str
    cancel_url: str


class Progress(BaseModel):
    """Denoising progress: ``step`` of ``total`` steps done (0/0 before the job starts)."""

    step: int = 0
    total: int = 0


class Timings(BaseModel):
    """Epoch seconds of each life-cycle point; null until reached."""

    enqueued: float | None = None
    classified: float | None = None
    started: float | None = None
    finished: float | None = None


class JobStatusResponse(BaseModel):
    """Answer of ``GET /v1/jobs/{id}``.

    ``queue_position`` (queued/classified jobs only, else null) is 0-based: the number of
    accepted, unfinished jobs enqueued before this one.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2c0d7e9b5a4c1e8d6f0a2b4c6e8f10",
                    "status": "running",
                    "tier": 1,
                    "predicted_tier": 1,
                    "probabilities": [0.1, 0.7, 0.2],
                    "progress": {"step": 4, "total": 10},
                    "queue_position": None,
                    "timings": {
                        "enqueued": 1764240000.0,
                        "classified": 1764240000.05,
                        "started": 1764240000.4,
                        "finished": None,
                    },
                    "error": None,
                    "images": 0,
                    "worker": "worker-0",
                    "attempts": 1,
                }
            ]
        }
    )

    id: str
    status: str
    tier: int | None = None
    predicted_tier: int | None = None
    probabilities: list[float] = []
    progress: Progress
    queue_position: int | None = None
    timings: Timings
    error: str | None = None
    images: int = 0
    worker: str | None = None
    attempts: int = 0


class CancelResponse(BaseModel):
    """Answer of ``POST /v1/jobs/{id}/cancel`` (202).

    ``cancelled``: the job was queued or classified and will never run (also returned
    again for an already-cancelled job). ``cancelling``: the job is running; its worker
    stops between two denoising steps and the job then becomes ``cancelled``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"id": "3f2c0d7e9b5a4c1e8d6f0a2b4c6e8f10", "status": "cancelling"}]
        }
    )

    id: str
    status: Literal["cancelled", "cancelling"]


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations`` (OpenAI Images API compatible).

    ``model`` and ``user`` are accepted and ignored (the tier is chosen per prompt by the
    classifier). Other OpenAI fields (``quality``, ``style``...) are ignored too, so the
    ``openai`` client works unchanged. ``size`` ``"auto"`` means T2I_DEFAULT_SIZE.
    """

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "two green triangles",
                    "n": 1,
                    "size": "32x32",
                    "response_format": "b64_json",
                }
            ]
        },
    )

    prompt: str
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = Field(default=None, description="Accepted and ignored.")
    user: str | None = Field(default=None, description="Accepted and ignored.")

    _prompt_not_blank = field_validator("prompt")(_not_blank)


class ImageData(BaseModel):
    """One generated image: exactly one of ``b64_json`` (PNG) or ``url`` is set."""

    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    """Answer of ``POST /v1/images/generations`` (200), as in the OpenAI Images API."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"created": 1764240001, "data": [{"b64_json": "iVBORw0KGgo..."}]}]
        }
    )

    created: int
    data: list[ImageData]


class StreamBacklog(BaseModel):
    """Backlog of one stream's consumer group: entries not yet delivered (``lag``),
    delivered but unacknowledged (``pending``), and the stream's length."""

    length: int = 0
    lag: int = 0
    pending: int = 0


class TierInfo(BaseModel):
    """One tier of the registry with its allocated GPUs (per the current plan) and backlog."""

    id: int
    name: str
    strategy: str
    steps: int
    skip: int
    model: str
    batch_sizes: list[int]
    gpus: int | None = Field(default=None, description="Workers assigned by the plan.")
    backlog: StreamBacklog


class TiersResponse(BaseModel):
    """Answer of ``GET /v1/tiers``: the registry, the current plan (or null), backlogs and
    the controller's latest state (or null)."""

    registry: str
    tiers: list[TierInfo]
    plan: AllocationPlan | None = None
    prompt_backlog: StreamBacklog
    controller: ControllerState | None = None


class HealthResponse(BaseModel):
    """Answer of ``GET /healthz``."""

    status: Literal["ok", "shutting_down"]


class ReadinessResponse(BaseModel):
    """Answer of ``GET /readyz``: 200 when ``ready``, else 503 with what is ``missing``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ready": False,
                    "checks": {
                        "redis": "ok",
                        "classifier": "ok",
                        "controller": "missing",
                        "workers": "0 live",
                    },
                    "missing": ["controller", "workers"],
                }
            ]
        }
    )

    ready: bool
    checks: dict[str, str]
    missing: list[str]
