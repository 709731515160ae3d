"""What the lifespan opens and the routes use, reached through typed dependencies (tests may override them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.batching import Batcher
from app.model import ModelHolder, Prediction
from app.redis_client import RedisConnection
from app.settings import Settings
from app.windows import WindowStore

PredictRequest = tuple[list[str], int]  # (window actions oldest first, k)


@dataclass
class Services:
    """The per-process resources: settings, the model holder, Redis and its window store, the batcher."""

    settings: Settings
    models: ModelHolder
    redis: RedisConnection
    store: WindowStore
    batcher: Batcher[PredictRequest, Prediction]

    @property
    def capacity(self) -> int:
        """Events kept per user: NEXTACT_WINDOW_SIZE, else the served model's window."""
        return self.settings.window_size or self.models.current.manifest.window

    async def predict(self, actions: list[str], k: int) -> Prediction:
        """The model's top-k for one window, through the micro-batcher."""
        return await self.batcher.submit((actions, k))


async def get_services(request: Request) -> Services:
    """The process's Services (async: a plain def dependency would cost a thread hop per request)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
