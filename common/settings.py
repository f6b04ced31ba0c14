"""Every knob of every Argus service, in one place (env prefix ``T2I_``).

Each field has an environment twin: ``GatewaySettings().max_prompt_chars`` is read from
``T2I_MAX_PROMPT_CHARS``. Settings objects are built in each service's ``main()`` and
passed down, so tests construct them directly.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import keys

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIERS_FILE = REPO_ROOT / "profiles" / "tiers.yaml"


def default_instance() -> str:
    """A name unique to this process on this host (used as consumer and heartbeat name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class CommonSettings(BaseSettings):
    """Knobs shared by every service."""

    model_config = SettingsConfigDict(env_prefix="T2I_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    log_level: str = "INFO"
    log_json: bool = False
    service_name: str = "argus"
    instance: str = Field(default_factory=default_instance)
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables the server")
    tiers_file: Path = DEFAULT_TIERS_FILE

    job_ttl_s: int = Field(default=keys.JOB_TTL_S, gt=0)
    result_ttl_s: int = Field(default=keys.RESULT_TTL_S, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_ttl_s: float = Field(default=5.0, gt=0)
    stream_block_ms: int = Field(default=1000, ge=1)
    claim_idle_ms: int = Field(
        default=30_000, ge=100, description="pending entries idle this long are reclaimed"
    )
    max_deliveries: int = Field(default=3, ge=1, description="then dead-lettered")
    deadline_policy: Literal["degrade", "expire"] = Field(
        default="degrade", description="a job that cannot meet its deadline: served at a "
        "cheaper tier (degrade) or ended as expired (expire); see docs/policies.md")
    profile_device: str = Field(
        default="", description="latency profile used for planning; '' = registry device")
    batch_slo_share: float = Field(
        default=0.5, ge=0, le=1, description="workers run the largest profiled batch whose "
        "latency is within this share of the SLO, and the controller plans capacity at it; "
        "0 = always the tier's largest batch")


class GatewaySettings(CommonSettings):
    """HTTP gateway."""

    service_name: str = "gateway"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    gateway_workers: int = Field(default=1, ge=1, description="uvicorn worker processes")
    max_prompt_chars: int = Field(default=2000, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    max_backlog: int = Field(default=10_000, gt=0, description="accepted, unfinished jobs")
    backlog_retry_after_s: int = Field(default=5, gt=0)
    overload_max_delay_s: float = Field(
        default=60.0, gt=0, description="while the controller reports overload, refuse "
        "new jobs without slo_ms whose estimated queueing delay exceeds this")
    sync_timeout_s: float = Field(default=120.0, gt=0)
    sse_keepalive_s: float = Field(default=15.0, gt=0, description="SSE comment after silence")
    allowed_sizes: list[str] = ["32x32", "64x64", "256x256", "512x512", "1024x1024"]
    default_size: str = "32x32"
    ready_heartbeat_max_age_s: float = Field(default=10.0, gt=0)
    public_url: str = Field(default="", description="base of URLs returned to clients")


class ClassifierSettings(CommonSettings):
    """Classifier service (tier decision)."""

    service_name: str = "classifier"
    policy: str = Field(default="static", description="T2I_POLICY: see docs/policies.md")
    predictor: str = Field(default="fixed", description="per-prompt tier predictor of "
                           "the argus, proteus and diffserve policies")
    fixed_tier: int = Field(default=0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    cascade_window: int = Field(default=1000, ge=1, description="diffserve: confidences "
                                "remembered to rank a prompt's confidence")
    state_max_age_s: float = Field(default=10.0, gt=0, description="ignore older "
                                   "controller state for deadline estimates")
    classifier_model: Path = Field(
        default=REPO_ROOT / "models" / "classifier" / "model.json",
        description="lgbm predictor: the trained model (argus classifier train)")
    classifier_tolerance: float = Field(
        default=0.05, ge=0, lt=1, description="a tier is safe for a prompt when its "
        "relative quality is >= 1 - tolerance (training labels)")
    classifier_confidence: float | None = Field(
        default=None, ge=0, le=1, description="lgbm: serve the cheapest tier whose "
        "safety probability is >= this; None: the model's calibrated value")
    classifier_embedder: str = Field(
        default="", description="lgbm: prompt embedder spec (world[:PATH] | "
        "open_clip:MODEL[:PRETRAINED]); '' = the one the model was trained with")
    classifier_reload_s: float = Field(default=5.0, gt=0, description="lgbm: seconds "
                                       "between checks for a new model or registry file")
    classifier_threads: int = Field(default=1, ge=0, description="lgbm: CPU threads "
                                    "for embedding and prediction (0: library defaults)")


class ControllerSettings(CommonSettings):
    """Controller service (plan publication)."""

    service_name: str = "controller"
    policy: str = Field(default="static", description="T2I_POLICY: see docs/policies.md")
    static_tier: int = Field(default=0, ge=0)
    control_period_s: float = Field(default=2.0, gt=0)
    formulation: Literal["flow", "argus"] = "flow"
    quality_file: Path = Field(default=REPO_ROOT / "profiles" / "world_quality.csv",
                               description="per-prompt quality table; absent: registry")
    quality_tolerance: float = Field(default=0.02, ge=0, description="a tier is safe for "
                                     "a prompt when within this of the exact quality")
    headroom: float = Field(default=0.1, ge=0, lt=1)
    hysteresis: float = Field(default=0.02, ge=0)
    switch_weight: float = Field(default=1.0, ge=0)
    switch_horizon_s: float = Field(default=60.0, gt=0, description="a model load's lost "
                                    "work is amortised over this many seconds")
    load_level_tau_s: float = Field(default=20.0, gt=0)
    load_trend_tau_s: float = Field(default=60.0, gt=0)
    load_horizon_s: float = Field(default=0.0, ge=0, description="0 = one control period")
    drain_horizon_s: float = Field(default=60.0, gt=0, description="plan to drain the "
                                   "backlog within this; longer drain = overloaded")
    mix_window_s: int = Field(default=60, ge=1, description="seconds of predicted-tier mix")
    arrivals_keep_s: int = Field(default=600, ge=10, description="then buckets are trimmed")


class WorkerSettings(CommonSettings):
    """GPU worker (one process per GPU)."""

    service_name: str = "worker"
    backend: str = Field(default="diffusers", description="diffusers | emulated")
    device: str = Field(default="cpu", description="cpu | cuda | cuda:N")
    dtype: str = Field(default="float32", description="float32 | float16 | bfloat16")
    model: str = Field(default="", description="overrides the tiers' model path or id")
    emulated_latency_scale: float = Field(default=1.0, ge=0, description="0 = no delay")
    max_batch: int = Field(default=0, ge=0, description="0 = the tier's largest batch size")
    plan_wait_s: float = Field(default=30.0, gt=0, description="wait this long for a plan")
    keepalive_s: float = Field(default=5.0, gt=0, description="re-claim own entries this often")
    cpu_threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 = torch default")
    cache_enabled: bool = Field(default=True, description="approximate cache (cache tiers)")
    cache_budget_bytes: int = Field(default=1 << 30, gt=0,
                                    description="total latent bytes per cache namespace")
    cache_dtype: str = Field(default="native",
                             description="stored latent dtype: native | float16 | float32")
    cache_min_similarity: float = Field(
        default=0.65, ge=-1, le=1, description="below this a cache tier job is a miss")
    cache_refresh_s: float = Field(default=1.0, ge=0,
                                   description="re-sync the local embedding index this often")


class TaskSettings(CommonSettings):
    """arq background worker: webhooks and periodic maintenance."""

    service_name: str = "tasks"
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_tries: int = Field(default=5, ge=1)
    maintenance_period_s: int = Field(default=60, ge=1)
    stream_trim_keep: int = Field(default=10_000, ge=0)
