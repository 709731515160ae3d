"""The service's one configuration object; every field is an env variable with the NEXTACT_ prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_URL_ENV = "_NEXTACT_EMBEDDED_REDIS_URL"  # set by app.__main__ for its workers; not a setting


class Settings(BaseSettings):
    """All service settings. Read once at start-up (see get_settings) and passed to create_app()."""

    model_config = SettingsConfigDict(
        env_prefix="NEXTACT_", extra="ignore", frozen=True, populate_by_name=True
    )

    # HTTP server (python -m app)
    host: str = Field("127.0.0.1", description="Interface uvicorn binds (0.0.0.0 in the container).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    workers: int = Field(
        1, ge=1, description="uvicorn worker processes (each opens its own Redis pool and model)."
    )

    # model
    artifact_dir: Path = Field(
        Path("artifacts/demo"),
        validation_alias=AliasChoices("NEXTACT_ARTIFACT_DIR", "NEXTACT_MODEL_DIR"),
        description="Directory holding model.onnx + manifest.json (NEXTACT_MODEL_DIR is accepted too).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime device: auto uses CUDA when the provider really loads, else CPU."
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = ORT default).")

    # redis
    redis_url: str | None = Field(
        None,
        description="redis://, rediss://, unix:// or redis+cluster:// URL. Unset: start an embedded Redis "
        "(only when NEXTACT_EMBEDDED_REDIS is true; else the service refuses to start).",
    )
    embedded_redis: bool = Field(
        True,
        description="With NEXTACT_REDIS_URL unset, start a private Redis inside this process group (development: "
        "its windows are not shared with other replicas). false: refuse to start without NEXTACT_REDIS_URL.",
    )
    data_dir: Path = Field(Path("data"), description="Embedded Redis: directory for its append-only file.")
    embedded_redis_port: int = Field(
        6399, ge=0, le=65535, description="Embedded Redis: loopback port (0 = pick a free one)."
    )
    embedded_redis_appendfsync: Literal["always", "everysec", "no"] = Field(
        "always",
        description="Embedded Redis: fsync policy of its append-only file (always: no acknowledged event is lost "
        "even if the server crashes; everysec: up to one second of events at risk, faster writes).",
    )
    redis_timeout_seconds: float = Field(
        1.0, gt=0, description="Socket connect/read timeout for Redis calls."
    )
    redis_queue_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest a request waits for a free Redis connection before a 503."
    )
    redis_max_connections: int = Field(
        64,
        ge=1,
        description="Redis connection pool size per process (per cluster node with redis+cluster://).",
    )
    redis_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of a Redis call after a connection error or timeout (short backoff).",
    )
    redis_pipeline_max: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Most script calls (appends, reads, state saves) of concurrent requests sent to Redis as one "
        "pipeline: the calls issued in one event-loop turn share a round trip (and, with appendfsync always, "
        "an fsync). 1: one round trip per call. A single server only; on a cluster each call goes on its own.",
    )
    key_prefix: str = Field(
        "nextact",
        min_length=1,
        max_length=64,
        pattern=r"^[^{}]+$",
        description="Prefix of every Redis key (no braces: the user id is the key's cluster hash tag).",
    )

    # windows
    window_size: int | None = Field(
        None, ge=1, le=10_000, description="Events kept per user (default: the model's window length)."
    )
    window_ttl_seconds: int = Field(
        30 * 24 * 3600, ge=1, description="A user's window expires after this idle time."
    )

    # request limits
    max_events_per_request: int = Field(1000, ge=1, description="More events in one request gives 413.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies give 413.")
    max_id_length: int = Field(256, ge=1, le=4096, description="Longest user_id / event_id accepted.")
    max_action_length: int = Field(256, ge=1, le=4096, description="Longest action string accepted.")
    default_k: int = Field(10, ge=1, description="Predictions returned when k is not given.")

    # micro-batching
    batch_max_size: int = Field(
        64, ge=1, description="Most predictions coalesced into one ONNX Runtime call."
    )
    batch_max_wait_ms: float = Field(
        1.5, ge=0, description="Longest a prediction waits for others to join its batch."
    )
    batch_inline_max_ms: float = Field(
        2.0,
        ge=0,
        description="A prediction that finds the service's batchers idle (nothing queued or running, no call "
        "ended and no prediction asked for in the last 2x the latest call's time) runs on the event loop's "
        "thread at once, without the two thread hand-offs, when the latest model call took at most this long "
        "(the first call always goes to the inference thread). 0: always hand off to the inference thread.",
    )
    inference_on: Literal["auto", "thread", "loop"] = Field(
        "auto",
        description="Where micro-batches run: thread (a dedicated inference thread, the event loop goes on "
        "parsing requests and talking to Redis meanwhile) or loop (on the event loop's own thread: one thread "
        "does everything, nothing is handed off, no two threads of the service compete for a core; for "
        "machines whose few cores are shared with Redis and other processes). auto: loop when the model runs "
        "on the CPU and each worker has at most 2 CPUs (the process's affinity, capped by its container's "
        "cgroup CPU quota such as --cpus, divided by NEXTACT_WORKERS), thread otherwise; resolved at start-up "
        "(a model reload keeps it); GET /v1/model says which, and why.",
    )
    switch_interval_ms: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Python's thread switch interval (sys.setswitchinterval): the longest the inference thread "
        "waits for the interpreter lock while the event loop's thread runs Python code. Unset: Python's own "
        "(5 ms), untouched.",
    )

    incremental_state: bool = Field(
        True,
        description="Keep each user's recurrent state in Redis and score a new event with the single-step graph "
        "(step.onnx) instead of recomputing the window. Applies only where the artifact has a step graph (else "
        "the window is recomputed) and, left at this default, not beside a candidate model. false: every request "
        "recomputes the window.",
    )

    gc_tuning: bool = Field(
        True,
        description="After start-up, freeze the heap built so far (model, routes, schemas) out of the garbage "
        "collector's reach and collect young objects less often (gc.freeze, gc.set_threshold(50000, 20, 100)): "
        "no long collection pauses mid-request. false: Python's defaults.",
    )
    log_level: str = Field("info", description="Python log level.")
    stage_timings: bool = Field(
        False,
        description="Record per-request stage timings (Redis, batch wait, inference, ...), GC pauses and "
        "event-loop lag, served as JSON on GET /debug/timings (no authentication: diagnosis only).",
    )

    # HTTP hardening: limits applied before any request reaches the application
    http_max_header_bytes: int = Field(
        16_384,
        ge=1024,
        le=1_048_576,
        description="Longest request head (request line plus headers) in bytes; longer gives 431 (414 for the "
        "request line alone).",
    )
    http_max_headers: int = Field(
        100, ge=8, le=10_000, description="Most header lines in one request; more gives 431."
    )
    http_header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A request head (or a new connection's first request) must arrive within this; "
        "else 408 and the connection is closed.",
    )
    http_body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A request body must arrive within this after its head; else 408 and close.",
    )
    http_keep_alive_seconds: int = Field(
        5, ge=1, description="An idle keep-alive connection is closed after this."
    )
    http_max_connections: int = Field(
        1000,
        ge=1,
        description="Open connections per worker process; a connection over it gets 503 and is closed.",
    )
    forwarded_allow_ips: str = Field(
        "",
        description="Comma-separated addresses (or CIDR ranges, or *) of the proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are trusted. Empty: trust none; the client address is the TCP peer.",
    )
    auth_failure_limit: int = Field(
        10,
        ge=0,
        description="Failed authentication attempts allowed per client address per window; after "
        "that every request from it gets 429 until the window ends. 0 = no limit.",
    )
    auth_failure_window_seconds: int = Field(
        60, ge=1, le=86_400, description="Length of the failed-authentication window."
    )

    # security, limits, operations (issue 6)
    api_keys: str | None = Field(
        None,
        description="Comma-separated API keys, or the path of a file with one per line. Set: every /v1 route "
        "needs 'Authorization: Bearer <key>' or 'X-API-Key'. Unset: no authentication (logged at start-up).",
    )
    rate_limit_requests: int = Field(
        0,
        ge=0,
        description="Requests allowed per key (or client address) per rate-limit window; 0 = no limit.",
    )
    rate_limit_window_seconds: int = Field(
        60, ge=1, le=86_400, description="Length of the rate-limit window."
    )
    rate_limit_algorithm: Literal["sliding", "fixed"] = Field(
        "sliding", description="sliding: weighted sliding-window counter; fixed: calendar windows."
    )
    min_event_timestamp: float = Field(
        0.0, description="Earliest event timestamp accepted (epoch seconds); earlier ones give 422."
    )
    max_future_seconds: float = Field(
        86_400.0, ge=0, description="Latest event timestamp accepted, as seconds past the server's clock."
    )
    artifact_watch_seconds: float = Field(
        0.0,
        ge=0,
        description="Poll the artifact directory this often and hot-reload a changed model; 0 = off.",
    )
    shutdown_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="On SIGTERM, how long in-flight requests get to finish before the process exits.",
    )
    retry_after_seconds: int = Field(
        1, ge=1, description="Retry-After sent with 503 while Redis is unreachable."
    )

    # live quality, candidate model, status page
    live_quality: bool = Field(
        True,
        description="Score each posted event against the prediction served before it (hr@k, MRR, per "
        "model version): the top-20 of every prediction is stored next to the user's window.",
    )
    quality_snapshot_seconds: float = Field(
        10.0, gt=0, description="How often the live figures are snapshotted for the /ui chart."
    )
    quality_history_size: int = Field(360, ge=1, description="Snapshots kept in memory for the /ui chart.")
    candidate_artifact_dir: Path | None = Field(
        None,
        description="A second model served beside the live one (shadow or canary); unset: none.",
    )
    candidate_mode: Literal["shadow", "canary"] = Field(
        "shadow",
        description="shadow: the candidate scores every request, its answer is not returned; "
        "canary: it answers NEXTACT_CANDIDATE_SHARE of users (a sticky hash of the user id).",
    )
    candidate_share: float = Field(
        0.05, ge=0, le=1, description="Canary: the share of users answered by the candidate."
    )


def redis_problem(settings: Settings) -> str | None:
    """Why the Redis settings cannot work (an actionable message), or None."""
    if settings.redis_url is None and not settings.embedded_redis:
        return (
            "NEXTACT_REDIS_URL is not set and NEXTACT_EMBEDDED_REDIS is false: set NEXTACT_REDIS_URL "
            "(e.g. redis://redis:6379/0, or redis+cluster://host:port), or NEXTACT_EMBEDDED_REDIS=true for a "
            "development Redis private to this process"
        )
    return None


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, built once per process."""
    return Settings()
