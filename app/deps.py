"""What the lifespan opens and the routes use, reached through typed dependencies (tests may override them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app import timings
from app.batching import Batcher
from app.candidate import Models, PredictRequest, Role, Served
from app.filters import Filters
from app.model import Prediction, ServingModel, StepRequest
from app.quality import DEPTH, LiveQuality, PredictionLog, pack, score_event
from app.redis_client import RedisConnection
from app.settings import Settings
from app.statesave import StateSaver, settle_all
from app.windows import AppendResult, NewEvent, WindowStore


@dataclass
class Services:
    """The per-process resources: settings, the models, Redis and its window store, the batcher."""

    settings: Settings
    models: Models
    redis: RedisConnection
    store: WindowStore
    batcher: Batcher[PredictRequest, Prediction]
    step_batcher: Batcher[StepRequest, tuple[Prediction, bytes | None]] | None = None  # incremental state on
    quality: LiveQuality | None = None  # NEXTACT_LIVE_QUALITY on
    prediction_log: PredictionLog | None = None
    state_saver: StateSaver | None = None  # incremental state on: new states are stored behind the answer
    inference_on: tuple[str, str] = ("thread", "set by NEXTACT_INFERENCE_ON")  # where batches run, and why

    @property
    def capacity(self) -> int:
        """Events kept per user: NEXTACT_WINDOW_SIZE, else the longest window of the served models."""
        return self.settings.window_size or self.models.served.window

    async def predict(
        self, actions: list[str], k: int, filters: Filters | None = None, user_id: str | None = None
    ) -> tuple[Prediction, Role]:
        """The top-k for one window from the model serving this user (the live one unless canary), batched."""
        model, role = (
            self.models.served.for_user(user_id) if user_id is not None else (self.models.current, "live")
        )
        return await timings.submit(self.batcher, (model, actions, k, filters)), role

    async def append(self, user_id: str, events: list[NewEvent]) -> AppendResult:
        """Store the events without predicting (live quality still scores the first new one)."""
        served = self.models.served
        if self.prediction_log is not None:  # the predictions may ride on a pending state save
            await settle_all(user_id, self.prediction_log, self.state_saver)
        stored = await self.store.append(user_id, events, self.capacity)
        if self.quality is not None:
            score_event(self.quality, stored.last, events, served.by_version)
        return stored

    async def append_and_predict(
        self, user_id: str, events: list[NewEvent], k: int, filters: Filters | None = None
    ) -> tuple[AppendResult, Prediction, Role]:
        """Store the events and predict from the updated window; with incremental state, from the carried state.

        Incremental: the append returns the stored state when it covers the window before these events; the
        step graph then runs over the new events only (else over the window from the zero state), and the new
        state is stored behind the answer unless another event for the user arrived meanwhile (then the next
        append rebuilds).
        Live quality: the append also hands back the predictions stored for the window before it, which score
        the first new event; the new predictions are stored behind the answer.
        """
        served = self.models.served  # one snapshot for the whole request
        model, role = served.for_user(user_id)
        # the user's pending writes from the previous request, both at once (at most SETTLE_SECONDS in all)
        await settle_all(user_id, self.prediction_log, self.state_saver)
        remembered = False  # live quality's predictions stored (with the state)
        if self.step_batcher is None or model.step is None:
            timings.mark("redis_start")
            stored = await self.store.append(user_id, events, self.capacity)
            timings.mark("redis_end")
            prediction = await timings.submit(self.batcher, (model, stored.actions, k, filters))
        else:
            timings.mark("redis_start")
            got = await self.store.append_with_state(user_id, events, self.capacity, model.version)
            timings.mark("redis_end")
            stored = got.result
            if not stored.accepted:  # only duplicates: the stored state (if any) still covers the window
                prediction = await timings.submit(self.batcher, (model, stored.actions, k, filters))
            else:
                request = StepRequest(stored.actions, k, got.state, stored.accepted, model.version, filters)
                prediction, state = await timings.submit(self.step_batcher, request)
                if state is not None and self.state_saver is not None:  # behind the answer, with the
                    # predictions live quality keeps for this window: one script call for both
                    records = self._own_records(stored, model, prediction, served)
                    saved = self.state_saver.save(user_id, got.seq, prediction.model_version, state, records)
                    remembered = saved and records is not None
                elif state is not None:
                    await self.store.save_state(user_id, got.seq, prediction.model_version, state)
        if self.quality is not None and self.prediction_log is not None:
            score_event(self.quality, stored.last, events, served.by_version)
            if stored.accepted and prediction.ranked is not None and not remembered:
                self._remember(user_id, stored, model, prediction, served)
        return stored, prediction, role

    def _own_records(
        self, stored: AppendResult, model: ServingModel, prediction: Prediction, served: Served
    ) -> bytes | None:
        """Live quality's records of this prediction when they can go with the state save (no shadow candidate
        to wait for), else None."""
        if (
            self.quality is None
            or self.prediction_log is None
            or not stored.accepted
            or prediction.ranked is None
            or prediction.model_version != model.version
            or served.shadow is not None
        ):
            return None
        return pack([(model.version, prediction.ranked, model.vocab_size)])

    def _remember(
        self, user_id: str, stored: AppendResult, model: ServingModel, prediction: Prediction, served: Served
    ) -> None:
        assert self.prediction_log is not None
        if prediction.model_version != model.version:  # the step graph ran on a model reloaded meanwhile
            return
        shadow = served.shadow
        ours = (model.version, prediction.ranked, model.vocab_size)
        if shadow is None:
            self.prediction_log.remember(user_id, stored.seq, pack([ours]))
            return

        async def records() -> bytes:  # the candidate scores the same window, behind the answer
            theirs = await self.batcher.submit((shadow, stored.actions, DEPTH, None))
            return pack([ours, (shadow.version, theirs.ranked, shadow.vocab_size)])

        self.prediction_log.remember(user_id, stored.seq, records)


async def get_services(request: Request) -> Services:
    """The process's Services (async: a plain def dependency would cost a thread hop per request)."""
    services: Services = request.app.state.services
    timings.mark("deps")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
