"""What the lifespan opens and the routes use, reached through typed dependencies (tests may override them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app import timings
from app.batching import Batcher
from app.model import ModelHolder, Prediction, StepRequest
from app.redis_client import RedisConnection
from app.settings import Settings
from app.windows import AppendResult, NewEvent, WindowStore

PredictRequest = tuple[list[str], int]  # (window actions oldest first, k)


@dataclass
class Services:
    """The per-process resources: settings, the model holder, Redis and its window store, the batcher."""

    settings: Settings
    models: ModelHolder
    redis: RedisConnection
    store: WindowStore
    batcher: Batcher[PredictRequest, Prediction]
    step_batcher: Batcher[StepRequest, tuple[Prediction, bytes | None]] | None = None  # incremental state on

    @property
    def capacity(self) -> int:
        """Events kept per user: NEXTACT_WINDOW_SIZE, else the served model's window."""
        return self.settings.window_size or self.models.current.manifest.window

    async def predict(self, actions: list[str], k: int) -> Prediction:
        """The model's top-k for one window, through the micro-batcher."""
        return await timings.submit(self.batcher, (actions, k))

    async def append_and_predict(self, user_id: str, events: list[NewEvent], k: int) -> tuple[AppendResult, Prediction]:
        """Store the events and predict from the updated window; with incremental state, from the carried state.

        Incremental: the append returns the stored state when it covers the window before these events; the
        step graph then runs over the new events only (else over the window from the zero state), and the new
        state is stored unless another event for the user arrived meanwhile (then the next append rebuilds).
        """
        model = self.models.current
        if self.step_batcher is None or model.step is None:
            timings.mark("redis_start")
            stored = await self.store.append(user_id, events, self.capacity)
            timings.mark("redis_end")
            return stored, await self.predict(stored.actions, k)
        got = await self.store.append_with_state(user_id, events, self.capacity, model.version)
        stored = got.result
        if not stored.accepted:  # only duplicates: the stored state (if any) still covers the window
            return stored, await self.predict(stored.actions, k)
        request = StepRequest(stored.actions, k, got.state, stored.accepted, model.version)
        prediction, state = await self.step_batcher.submit(request)
        if state is not None:
            await self.store.save_state(user_id, got.seq, prediction.model_version, state)
        return stored, prediction


async def get_services(request: Request) -> Services:
    """The process's Services (async: a plain def dependency would cost a thread hop per request)."""
    services: Services = request.app.state.services
    timings.mark("deps")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
