"""create_app(): the FastAPI application; its lifespan opens the model, Redis (embedded if needed) and the batcher."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead

from app import gctune, routes, timings
from app.batching import Batcher, InlineGate, choose_inference_on, usable_cpus
from app.candidate import Models, PredictRequest, predict_mixed
from app.deps import Services
from app.docs_ui import install_docs
from app.errors import BodyLimitMiddleware, install_error_handlers
from app.model import Device, ModelLoadError, Prediction, ServingModel, StepRequest, load_model
from app.observability import MeteredWindowStore, Metrics, ObservabilityMiddleware
from app.quality import DEPTH, LiveQuality, PredictionLog
from app.ratelimit import RateLimiter
from app.redis_client import call_deadline, connect
from app.redis_server import EmbeddedRedis
from app.reload import Reloader, ReloadError, load_and_check
from app.security import ApiKeyAuth, FailedAuthLimiter
from app.settings import EMBEDDED_URL_ENV, Settings, get_settings, redis_problem
from app.statesave import StateSaver
from app.windows import StoreUnavailable

log = logging.getLogger(__name__)


class RedisSettingsError(RuntimeError):
    """The Redis settings cannot work (no URL and no embedded server); the message says what to set."""


DESCRIPTION = """Predicts a user's next action from their recent events.

POST a user's events and get the probabilities of their next action back on the same request. Each user's
window of recent events lives in Redis (shared by every replica, kept across restarts); the model is an
LSTM/GRU exported to ONNX and run by ONNX Runtime.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open everything once per worker process, in an order that fails fast, and close it in reverse."""
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        metrics: Metrics = app.state.metrics
        if settings.switch_interval_ms is not None:  # process-wide: put back on exit
            stack.callback(sys.setswitchinterval, sys.getswitchinterval())
            sys.setswitchinterval(settings.switch_interval_ms / 1000)
        if app.state.stage_timings is not None:  # NEXTACT_STAGE_TIMINGS: GC callback and loop-lag probe
            await stack.enter_async_context(app.state.stage_timings.running())
        if (
            metrics.multiprocess_dir is not None
        ):  # live gauges (in flight, model info) forget this worker on exit
            stack.callback(mark_process_dead, os.getpid(), metrics.multiprocess_dir)
        incremental = _incremental(settings)
        load = partial(_load_checked, device=settings.device, intra_op_threads=settings.intra_op_threads)
        if incremental:  # off: the same call as before the option existed
            load = partial(load, incremental=True)
        if settings.live_quality:
            load = partial(load, rank_depth=DEPTH)
        try:
            model = await asyncio.to_thread(load, settings.artifact_dir)
            candidate = None
            if settings.candidate_artifact_dir is not None:
                candidate = await asyncio.to_thread(load, settings.candidate_artifact_dir)
        except ReloadError as e:  # the same checks as a reload; at start-up they stop the service
            raise ModelLoadError(str(e)) from e
        holder = Models(model)
        if candidate is not None:
            holder.set_candidate(candidate, settings.candidate_mode, settings.candidate_share)
        _show_model(metrics, model)
        url = settings.redis_url
        problem = redis_problem(settings)
        if problem is not None:
            raise RedisSettingsError(problem)
        embedded_here = url is None
        if url is None:
            embedded = EmbeddedRedis(
                settings.data_dir,
                port=settings.embedded_redis_port,
                appendfsync=settings.embedded_redis_appendfsync,
            )
            await asyncio.to_thread(embedded.start)
            stack.push_async_callback(asyncio.to_thread, embedded.stop)
            url = embedded.url
        redis = connect(
            url,
            settings.redis_max_connections,
            settings.redis_timeout_seconds,
            settings.redis_retries,
            settings.redis_pipeline_max,
        )
        # a parent `python -m app` with several workers starts the embedded server and passes its URL on
        redis.embedded = embedded_here or os.environ.get(EMBEDDED_URL_ENV) == url
        if redis.embedded:
            log.warning(
                "using the embedded Redis at %s: windows are private to this host and not shared with "
                "other replicas (set NEXTACT_REDIS_URL for production)",
                redis.address,
            )
        stack.push_async_callback(redis.close)
        store = MeteredWindowStore(
            redis.client,
            settings.key_prefix,
            settings.window_ttl_seconds,
            redis.address,
            max_concurrency=settings.redis_max_connections,
            direct=redis.direct,
            queue_timeout_seconds=settings.redis_queue_timeout_seconds,
            call_timeout_seconds=call_deadline(settings.redis_timeout_seconds, settings.redis_retries),
            metrics=metrics,
            known=lambda action: holder.current.knows(action),
        )
        try:
            await store.load_script()
        except StoreUnavailable as e:  # serve anyway: /readyz says 503 and requests 503 until Redis is back
            log.warning("%s; starting without it", e)

        # resolved once, for the live model at start-up (a reload keeps it); workers share the CPUs
        inference_on, inference_why = choose_inference_on(
            settings.inference_on, holder.current.provider, usable_cpus() / max(1, settings.workers)
        )
        log.info("micro-batches run on the %s (%s)", inference_on, inference_why)
        gate = InlineGate()  # both batchers share the one event loop an inline call blocks
        batcher: Batcher[PredictRequest, Prediction] = Batcher(
            predict_mixed,
            max_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            on_batch=metrics.observe_batch,
            inline_max_s=settings.batch_inline_max_ms / 1000,
            gate=gate,
            on_loop=inference_on == "loop",
        )
        stack.push_async_callback(batcher.close)
        step_batcher: Batcher[StepRequest, tuple[Prediction, bytes | None]] | None = None
        state_saver = None
        if incremental:

            def advance(batch: list[StepRequest]) -> list[tuple[Prediction, bytes | None]]:
                return holder.current.advance(batch)

            step_batcher = Batcher(
                advance,
                max_size=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000,
                on_batch=metrics.observe_batch,
                name="nextact-step",
                inline_max_s=settings.batch_inline_max_ms / 1000,
                gate=gate,
                on_loop=inference_on == "loop",
            )
            stack.push_async_callback(step_batcher.close)
            state_saver = StateSaver(store, metrics)
            stack.push_async_callback(state_saver.drain)  # before the batcher and Redis close
        if settings.rate_limit_requests:
            app.state.rate_limiter = RateLimiter(
                redis.client,
                limit=settings.rate_limit_requests,
                window_seconds=settings.rate_limit_window_seconds,
                key_prefix=settings.key_prefix,
                algorithm=settings.rate_limit_algorithm,
                timeout_seconds=settings.redis_timeout_seconds,
                direct=redis.direct,
            )

        def install(new: ServingModel) -> None:
            holder.install(new)
            _show_model(metrics, new)

        reloader: Reloader[ServingModel] = Reloader(
            settings.artifact_dir,
            load=load,
            install=install,
            version=lambda m: m.version,
            current=lambda: holder.current,
            metrics=metrics,
        )
        app.state.reloader = reloader
        reloader.start_watch(settings.artifact_watch_seconds)
        stack.push_async_callback(reloader.stop_watch)
        app.state.candidate_reloader = _candidate_reloader(settings, holder, load, metrics)

        def promote() -> tuple[str, str]:
            old = holder.promote()
            _show_model(metrics, holder.current)
            return old.live.version, holder.current.version

        app.state.promote = promote
        quality: LiveQuality = app.state.quality
        prediction_log = None
        if settings.live_quality:
            prediction_log = PredictionLog(store, quality)
            stack.push_async_callback(prediction_log.drain)  # before the batcher and Redis close
            snapshots = asyncio.create_task(_snapshots(quality, holder, settings.quality_snapshot_seconds))
            stack.callback(snapshots.cancel)
        app.state.services = Services(
            settings,
            holder,
            redis,
            store,
            batcher,
            step_batcher,
            quality if settings.live_quality else None,
            prediction_log,
            state_saver,
            (inference_on, inference_why),
        )
        if settings.gc_tuning:  # last: everything start-up built is in the frozen heap
            stack.enter_context(gctune.frozen_heap())
        log.info(
            "nextact ready: model %s, Redis at %s, window %d",
            model.version,
            redis.address,
            app.state.services.capacity,
        )
        yield


def _incremental(settings: Settings) -> bool:
    """Incremental state for this process: on unless turned off, or left at its default beside a candidate."""
    if not settings.incremental_state:
        return False
    if settings.candidate_artifact_dir is None:
        return True
    if "incremental_state" in settings.model_fields_set:
        raise ModelLoadError(
            "NEXTACT_CANDIDATE_ARTIFACT_DIR cannot be used with NEXTACT_INCREMENTAL_STATE=true (the carried "
            "state is per model): unset one of them"
        )
    log.info("incremental state off: a candidate model is configured (the carried state is per model)")
    return False


def _load_checked(
    artifact_dir: Path, device: Device, intra_op_threads: int, incremental: bool = False, rank_depth: int = 0
) -> ServingModel:
    """load_model plus the reload self-check (hash, probe batch): start-up and reloads serve only checked models."""
    return load_and_check(
        artifact_dir,
        partial(
            load_model,
            device=device,
            intra_op_threads=intra_op_threads,
            incremental=incremental,
            rank_depth=rank_depth,
        ),
    )


def _candidate_reloader(
    settings: Settings, holder: Models, load: Callable[[Path], ServingModel], metrics: Metrics
) -> Reloader[ServingModel] | None:
    """Reloads (or first loads) the candidate from NEXTACT_CANDIDATE_ARTIFACT_DIR; None when that is unset."""
    if settings.candidate_artifact_dir is None:
        return None

    def current() -> ServingModel | None:
        c = holder.served.candidate
        return c.model if c is not None else None

    return Reloader(
        settings.candidate_artifact_dir,
        load=load,
        version=lambda m: m.version,
        current=current,
        metrics=metrics,
        install=lambda m: holder.set_candidate(m, settings.candidate_mode, settings.candidate_share),
    )


async def _snapshots(quality: LiveQuality, holder: Models, every: float) -> None:
    """Snapshot the served models' live figures every `every` seconds (the /ui chart's points)."""
    while True:
        served = holder.served
        quality.snapshot(
            [served.live.version] + ([served.candidate.model.version] if served.candidate else [])
        )
        await asyncio.sleep(every)


def _show_model(metrics: Metrics, model: ServingModel) -> None:
    m = model.manifest
    metrics.set_model(
        model_version=m.model_version,
        cell=m.cell,
        window=m.window,
        vocab_size=m.vocab_size,
        provider=model.provider,
    )


def _current_version(app: FastAPI) -> Callable[[], str | None]:
    def version() -> str | None:
        services: Services | None = getattr(app.state, "services", None)
        return services.models.current.version if services is not None else None

    return version


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for `settings` (default: from the environment); nothing is opened until start-up."""
    settings = settings or get_settings()
    app = FastAPI(
        title="nextact",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "events", "description": "Post events, read and erase windows."},
            {"name": "predictions", "description": "Next-action probabilities."},
            {"name": "model", "description": "The model being served."},
            {"name": "health", "description": "Liveness and readiness."},
        ],
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.quality = LiveQuality(app.state.metrics.registry, settings.quality_history_size)
    app.state.auth = ApiKeyAuth.from_setting(settings.api_keys)
    app.state.rate_limiter = None  # set by the lifespan when NEXTACT_RATE_LIMIT_REQUESTS > 0
    app.state.auth_limiter = (
        FailedAuthLimiter(settings.auth_failure_limit, settings.auth_failure_window_seconds)
        if settings.auth_failure_limit
        else None
    )
    install_error_handlers(app, settings.retry_after_seconds)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # outermost: sees every answer (413s and auth failures included) and stamps its request id on it
    app.add_middleware(
        ObservabilityMiddleware,
        metrics=app.state.metrics,
        model_version=_current_version(app),
        auth_enabled=app.state.auth.enabled,
    )
    app.state.stage_timings = timings.install(app) if settings.stage_timings else None
    app.include_router(routes.v1)
    app.include_router(routes.router)
    install_docs(app)  # /docs and /redoc from local assets, not a CDN
    return app
