"""create_app(): the FastAPI application; its lifespan opens the model, Redis (embedded if needed) and the batcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from app import routes
from app.batching import Batcher
from app.deps import PredictRequest, Services
from app.errors import BodyLimitMiddleware, install_error_handlers
from app.model import ModelHolder, Prediction, load_model
from app.redis_client import connect
from app.redis_server import EmbeddedRedis
from app.settings import Settings, get_settings
from app.windows import StoreUnavailable, WindowStore

log = logging.getLogger(__name__)

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
        model = await asyncio.to_thread(load_model, settings.artifact_dir, settings.device, settings.intra_op_threads)
        holder = ModelHolder(model)
        url = settings.redis_url
        if url is None:
            embedded = EmbeddedRedis(settings.data_dir, port=settings.embedded_redis_port)
            await asyncio.to_thread(embedded.start)
            stack.push_async_callback(asyncio.to_thread, embedded.stop)
            url = embedded.url
        redis = connect(url, settings.redis_max_connections, settings.redis_timeout_seconds, settings.redis_retries)
        stack.push_async_callback(redis.close)
        store = WindowStore(
            redis.client, settings.key_prefix, settings.window_ttl_seconds, redis.address,
            max_concurrency=settings.redis_max_connections, direct=redis.direct,
        )
        try:
            await store.load_script()
        except StoreUnavailable as e:  # serve anyway: /readyz says 503 and requests 503 until Redis is back
            log.warning("%s; starting without it", e)

        def run(batch: list[PredictRequest]) -> list[Prediction]:
            return holder.current.predict(batch)  # one model for the whole batch, even across a hot swap

        batcher: Batcher[PredictRequest, Prediction] = Batcher(
            run, max_size=settings.batch_max_size, max_wait_s=settings.batch_max_wait_ms / 1000
        )
        stack.push_async_callback(batcher.close)
        app.state.services = Services(settings, holder, redis, store, batcher)
        log.info("nextact ready: model %s, Redis at %s, window %d", model.version, redis.address,
                 app.state.services.capacity)
        yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for `settings` (default: from the environment); nothing is opened until start-up."""
    settings = settings or get_settings()
    app = FastAPI(
        title="nextact", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
        openapi_tags=[
            {"name": "events", "description": "Post events, read and erase windows."},
            {"name": "predictions", "description": "Next-action probabilities."},
            {"name": "model", "description": "The model being served."},
            {"name": "health", "description": "Liveness and readiness."},
        ],
    )
    app.state.settings = settings
    install_error_handlers(app, settings.retry_after_seconds)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.include_router(routes.router)
    return app
