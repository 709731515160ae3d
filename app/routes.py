"""The HTTP surface. Thin: check limits, call the window store and the batcher, shape the answer."""

from __future__ import annotations

import asyncio
import time
from functools import lru_cache
from pathlib import Path as PathLib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import HTMLResponse
from starlette.convertors import register_url_convertor

from app import hotpath
from app.candidate import Candidate, NoCandidate
from app.deps import Services, ServicesDep, get_services
from app.errors import JSONBytes, error_response
from app.events import AnythingConvertor, InvalidField, check_count, check_string, check_user_id, new_event
from app.filters import Filters
from app.model import Prediction
from app.observability import Metrics
from app.quality import LiveQuality
from app.ratelimit import enforce_rate_limit
from app.reload import Reloader, ReloadError
from app.schemas import (
    BulkEvents,
    BulkResult,
    ErrorBody,
    EventBatch,
    Health,
    ModelInfo,
    PromoteResult,
    QualityHistory,
    Ready,
    ReloadResult,
    UserEventsBody,
    UserPrediction,
    UserWindow,
)
from app.security import is_authenticated, require_api_key
from app.windows import NewEvent, StoreUnavailable

_ACCESS_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key (when NEXTACT_API_KEYS is set)"},
    429: {"model": ErrorBody, "description": "Rate limit exceeded (with Retry-After)"},
}
# any character, a newline and '/' included: the last segment names the route, the rest is the user id
register_url_convertor("anything", AnythingConvertor())
router = APIRouter()  # open: health, readiness, metrics
v1 = APIRouter(
    dependencies=[Depends(require_api_key), Depends(enforce_rate_limit)],
    responses=_ACCESS_ERRORS,
    route_class=hotpath.HotRoute,  # the hot routes' fast paths (below) in front of FastAPI's handler
)
MODEL_VERSION_HEADER = "X-Model-Version"

USER_ID_RULE = (
    "The user's id. Any string of 1 to NEXTACT_MAX_ID_LENGTH characters (default 256) that is valid Unicode "
    "(no lone surrogates): the same rule for the path and for `user_id` in a body, so every user that can be "
    "written can be read and erased. In a path, percent-encode it (`/` as %2F, `?` as %3F, `#` as %23, `%` as "
    "%25; an id of `.` or `..` as %2E or %2E%2E, since clients drop such segments); a `/` sent as it is works too."
)
UserId = Annotated[str, Path(min_length=1, description=USER_ID_RULE, examples=["u-42"])]
MAX_K = 100_000
K = Annotated[
    int | None,
    Query(
        ge=1,
        le=MAX_K,
        description="How many predictions to return (default NEXTACT_DEFAULT_K; "
        "at most the vocabulary less <pad> and <unk>).",
        examples=[10],
    ),
]
Predict = Annotated[bool, Query(description="Also return one prediction per user.", examples=[False])]
Target = Annotated[
    Literal["live", "candidate"],
    Query(
        description="Which model to reload: the live one (NEXTACT_ARTIFACT_DIR) or the candidate "
        "(NEXTACT_CANDIDATE_ARTIFACT_DIR).",
        examples=["live"],
    ),
]
MAX_FILTER_ACTIONS = 1000  # entries of exclude= plus include= in one request


async def prediction_filters(
    request: Request,
    exclude_window: Annotated[
        bool,
        Query(
            description="Leave out actions already in the user's window (e.g. items bought once).",
            examples=[True],
        ),
    ] = False,
    exclude: Annotated[
        list[str] | None,
        Query(
            description="Actions never to return; repeat the parameter for several (`exclude=buy&exclude=fav`).",
            examples=[["buy"]],
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        Query(
            description="Return only these actions; repeat the parameter for several (`include=cart&include=buy`).",
            examples=[["cart", "buy"]],
        ),
    ] = None,
    renormalize: Annotated[
        bool,
        Query(
            description="Divide each returned probability by the model's total probability of the actions the "
            "filters allow (so they are a distribution over what may be returned). Default: the model's "
            "own probabilities.",
            examples=[False],
        ),
    ] = False,
) -> Filters | None:
    """The request's filters, applied before top-k: k answers come back when at least k actions remain."""
    settings = request.app.state.settings
    lists = (("exclude", exclude or []), ("include", include or []))
    if sum(len(values) for _, values in lists) > MAX_FILTER_ACTIONS:
        raise InvalidField(
            ("query", "exclude"), f"more than {MAX_FILTER_ACTIONS} actions in exclude= and include="
        )
    for name, values in lists:
        for i, action in enumerate(values):
            check_string(action, settings.max_action_length, "NEXTACT_MAX_ACTION_LENGTH", ("query", name, i))
    return Filters.of(exclude, include, exclude_window, renormalize)


FiltersDep = Annotated[Filters | None, Depends(prediction_filters)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        413: "Body or batch too large",
        422: "Invalid field (named in the message)",
        503: "Redis unavailable (with Retry-After)",
        500: "Inference failed",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def _prediction(user_id: str, window_size: int, p: Prediction, role: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "model_version": p.model_version,
        "served_by": role,
        "window_size": window_size,
        "unknown_actions": p.unknown_actions,
        "predictions": [
            {"action": a, "probability": q} for a, q in zip(p.actions, p.probabilities, strict=True)
        ],
    }


async def _query_args(request: Request) -> tuple[int | None, Filters | None] | None:
    """k and the filters of a plain query, or None: FastAPI's handler coerces or refuses the values."""
    query = hotpath.Query(request)
    k = query.integer("k", 1, MAX_K)
    exclude_window = query.flag("exclude_window", False)
    renormalize = query.flag("renormalize", False)
    exclude, include = query.strings("exclude"), query.strings("include")
    if not query.ok:
        return None
    try:
        filters = await prediction_filters(request, exclude_window, exclude, include, renormalize)
    except InvalidField:  # refused by FastAPI's handler, after authentication and rate limiting
        return None
    return k, filters


async def _admit(request: Request) -> Services:
    """The v1 router's dependencies, in FastAPI's order (they raise the same 401/429), then the services."""
    await require_api_key(request)
    await enforce_rate_limit(request)
    return await get_services(request)


FAST_RUNS = (require_api_key, enforce_rate_limit, get_services, prediction_filters)
FAST_READS = ("user_id", "k", "exclude_window", "exclude", "include", "renormalize")


async def _post_user_events_fast(request: Request, body: Any) -> Response | None:
    args = await _query_args(request)
    if args is None:
        return None
    svc = await _admit(request)
    return await post_user_events(request.path_params["user_id"], body, svc, args[1], args[0])


async def _get_predictions_fast(request: Request, _: Any) -> Response | None:
    args = await _query_args(request)
    if args is None:
        return None
    svc = await _admit(request)
    return await get_predictions(request.path_params["user_id"], svc, args[1], args[0])


@v1.post(
    "/v1/users/{user_id:anything}/events",
    response_model=UserPrediction,
    response_class=JSONBytes,
    tags=["events"],
    responses=_errors(413, 422, 503, 500),
)
@hotpath.fast_path(_post_user_events_fast, runs=FAST_RUNS, reads=FAST_READS)
async def post_user_events(
    user_id: UserId, body: UserEventsBody, svc: ServicesDep, filters: FiltersDep, k: K = None
) -> Response:
    """Append one event, or `{"events": [...]}`, to the user's window and predict their next action.

    Events land in timestamp order (a late event is inserted in its place); an `event_id` already in the
    window is skipped, so re-sending is safe. The answer is the prediction from the updated window.
    """
    settings = svc.settings
    check_user_id(user_id, settings)
    if isinstance(body, EventBatch):
        check_count(len(body.events), settings)
        now = time.time()
        events = [new_event(e, now, settings, ("body", "events", i)) for i, e in enumerate(body.events)]
    else:
        events = [new_event(body, time.time(), settings, ("body",))]
    stored, p, role = await svc.append_and_predict(user_id, events, k or settings.default_k, filters)
    return JSONBytes(
        _prediction(user_id, len(stored.actions), p, role), headers={MODEL_VERSION_HEADER: p.model_version}
    )


@v1.post(
    "/v1/events",
    response_model=BulkResult,
    response_class=JSONBytes,
    tags=["events"],
    responses=_errors(413, 422, 503, 500),
)
async def post_events(
    body: BulkEvents, svc: ServicesDep, filters: FiltersDep, predict: Predict = False, k: K = None
) -> Response:
    """Ingest events of many users at once; with `?predict=true` also predict for each user.

    The filters (exclude_window, exclude, include, renormalize) apply to every user's prediction.

    Each user's events are stored atomically; users are independent, so after a 503 some users may be
    stored and others not: resending events that carry an `event_id` is safe.
    """
    settings = svc.settings
    check_count(len(body.events), settings)
    now = time.time()
    per_user: dict[str, list[NewEvent]] = {}
    for i, e in enumerate(body.events):
        check_user_id(e.user_id, settings, ("body", "events", i, "user_id"))
        per_user.setdefault(e.user_id, []).append(new_event(e, now, settings, ("body", "events", i)))
    users = list(per_user)
    if predict:
        kk = k or settings.default_k
        triples = await asyncio.gather(*(svc.append_and_predict(u, per_user[u], kk, filters) for u in users))
        stored = [s for s, _, _ in triples]
    else:
        stored = await asyncio.gather(*(svc.append(u, per_user[u]) for u in users))
    result: dict[str, Any] = {
        "accepted": sum(s.accepted for s in stored),
        "duplicates": sum(s.duplicates for s in stored),
    }
    if predict:
        result["predictions"] = [
            _prediction(u, len(s.actions), p, role) for u, (s, p, role) in zip(users, triples, strict=True)
        ]
    return JSONBytes(result)


@v1.get(
    "/v1/users/{user_id:anything}/predictions",
    response_model=UserPrediction,
    response_class=JSONBytes,
    tags=["predictions"],
    responses=_errors(422, 503, 500),
)
@hotpath.fast_path(_get_predictions_fast, runs=FAST_RUNS, reads=FAST_READS)
async def get_predictions(user_id: UserId, svc: ServicesDep, filters: FiltersDep, k: K = None) -> Response:
    """Predict the user's next action from their current window, without adding anything.

    A user with no stored events gets the model's prediction for an empty window (window_size 0).
    Filters: `exclude_window=true` leaves out actions already in the window, `exclude=`/`include=` (repeatable)
    leave out or keep only the actions named, all before top-k; `renormalize=true` rescales what is returned.
    Example: `GET /v1/users/u-42/predictions?k=5&exclude_window=true&exclude=pv`.
    """
    check_user_id(user_id, svc.settings)
    actions = await svc.store.actions(user_id, svc.capacity)
    p, role = await svc.predict(actions, k or svc.settings.default_k, filters, user_id)
    return JSONBytes(
        _prediction(user_id, len(actions), p, role), headers={MODEL_VERSION_HEADER: p.model_version}
    )


@v1.get(
    "/v1/users/{user_id:anything}/events",
    response_model=UserWindow,
    response_class=JSONBytes,
    tags=["events"],
    responses=_errors(422, 503),
)
async def get_user_events(user_id: UserId, svc: ServicesDep) -> Response:
    """The user's stored window, oldest first, with the event ids (server-assigned where none was sent)."""
    check_user_id(user_id, svc.settings)
    events = await svc.store.events(user_id)
    return JSONBytes(
        {
            "user_id": user_id,
            "events": [
                {"action": e.action, "timestamp": e.timestamp, "event_id": e.event_id} for e in events
            ],
        }
    )


@v1.delete(
    "/v1/users/{user_id:anything}",
    status_code=204,
    response_class=Response,
    tags=["events"],
    responses=_errors(422, 503),
)
async def delete_user(user_id: UserId, svc: ServicesDep) -> Response:
    """Erase everything stored for the user (window, dedupe index, carried state). 204 even if nothing was there."""
    check_user_id(user_id, svc.settings)
    await svc.store.delete(user_id)
    return Response(status_code=204)


@v1.get("/v1/model", response_model=ModelInfo, response_class=JSONBytes, tags=["model"])
async def get_model(svc: ServicesDep) -> Response:
    """The model being served: manifest summary, offline and live metrics, the execution provider in use,
    and the candidate model beside it (if any) with its own offline and live metrics."""
    served = svc.models.served
    model = served.live
    m = model.manifest
    return JSONBytes(
        {
            "model_version": m.model_version,
            "created_at": m.created_at,
            "cell": m.cell,
            "window": m.window,
            "window_size": svc.capacity,
            "vocabulary_size": m.vocab_size,
            "embedding_dim": m.embedding_dim,
            "hidden_dim": m.hidden_dim,
            "num_layers": m.num_layers,
            "metrics": m.metrics,
            "execution_provider": model.provider,
            "providers": model.providers,
            "device": model.device,
            "inference_on": svc.inference_on[0],
            "inference_on_reason": svc.inference_on[1],
            "artifact_dir": str(model.artifact_dir),
            "embedded_redis": svc.redis.embedded,
            "live_metrics": svc.quality.figures(model.version) if svc.quality is not None else None,
            "candidate": _candidate_info(svc, served.candidate),
        }
    )


def _candidate_info(svc: Services, candidate: Candidate | None) -> dict[str, Any] | None:
    if candidate is None:
        return None
    c, m = candidate.model, candidate.model.manifest
    return {
        "model_version": c.version,
        "mode": candidate.mode,
        "share": candidate.share,
        "window": m.window,
        "vocabulary_size": m.vocab_size,
        "artifact_dir": str(c.artifact_dir),
        "metrics": m.metrics,
        "live_metrics": svc.quality.figures(c.version) if svc.quality is not None else None,
    }


@v1.post(
    "/v1/model/reload",
    response_model=ReloadResult,
    response_class=JSONBytes,
    tags=["model"],
    responses={
        409: {"model": ErrorBody, "description": "The new artifact was refused; the old model keeps serving"}
    },
)
async def reload_model(request: Request, svc: ServicesDep, target: Target = "live") -> Response:
    """Load the artifact in NEXTACT_ARTIFACT_DIR again, self-check it and swap it in.

    Loading runs in the background of this process; predictions already running finish on the old model.
    A broken artifact (bad manifest, hash mismatch, load failure, non-finite or non-normalised output) is
    refused with 409 and the old model keeps serving. `?target=candidate` (re)loads the candidate from
    NEXTACT_CANDIDATE_ARTIFACT_DIR instead, in NEXTACT_CANDIDATE_MODE (also after a promote emptied the slot).
    """
    reloader: Reloader[Any] | None = request.app.state.reloader
    if target == "candidate":
        reloader = request.app.state.candidate_reloader
        if reloader is None:
            return error_response(
                409,
                "reload_refused",
                "no candidate configured: set NEXTACT_CANDIDATE_ARTIFACT_DIR "
                "(not available with NEXTACT_INCREMENTAL_STATE)",
            )
    assert reloader is not None
    try:
        outcome = await reloader.reload(reason="api" if target == "live" else "api, candidate")
    except ReloadError as e:
        return error_response(
            409,
            "reload_refused",
            f"new {target} model refused, still serving {svc.models.current.version}: {e}",
        )
    return JSONBytes(
        {
            "model_version": outcome.model_version,
            "previous_version": outcome.previous_version or "",
            "seconds": round(outcome.seconds, 3),
        },
        headers={MODEL_VERSION_HEADER: outcome.model_version or ""},
    )


@v1.post(
    "/v1/model/promote",
    response_model=PromoteResult,
    response_class=JSONBytes,
    tags=["model"],
    responses={409: {"model": ErrorBody, "description": "There is no candidate to promote"}},
)
async def promote_model(request: Request) -> Response:
    """Make the candidate the live model, at once and for every request that starts after this one.

    One reference swap in this process: a request already running finishes with the pair it started with.
    The old live model is dropped and the candidate slot is empty until `reload?target=candidate`. A restart
    serves NEXTACT_ARTIFACT_DIR again: point it at the promoted artifact (see docs/live-quality.md).
    """
    try:
        previous, now = request.app.state.promote()
    except NoCandidate as e:
        return error_response(409, "no_candidate", str(e))
    return JSONBytes(
        {"model_version": now, "previous_version": previous}, headers={MODEL_VERSION_HEADER: now}
    )


@v1.get("/v1/model/quality", response_model=QualityHistory, response_class=JSONBytes, tags=["model"])
async def quality_history(request: Request, svc: ServicesDep) -> Response:
    """Snapshots of each model's live figures over time, oldest first (the /ui chart's data)."""
    served = svc.models.served
    quality: LiveQuality = request.app.state.quality
    return JSONBytes(
        {
            "live_version": served.live.version,
            "candidate_version": served.candidate.model.version if served.candidate else None,
            "points": list(quality.history),
        }
    )


@router.get("/ui", response_class=HTMLResponse, tags=["health"], include_in_schema=False)
async def status_page() -> Response:
    """The status page: models, live vs offline quality, a chart of live hr@10, a playground (static)."""
    return HTMLResponse(_ui_page())


@lru_cache(maxsize=1)
def _ui_page() -> bytes:
    return (PathLib(__file__).parent / "static" / "ui.html").read_bytes()


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this process (no authentication: keep it on the internal network)."""
    registry: Metrics = request.app.state.metrics
    body, content_type = registry.render()
    return Response(body, media_type=content_type)


@router.get("/healthz", response_model=Health, response_class=JSONBytes, tags=["health"])
async def healthz() -> Response:
    """The process is alive (no dependency is checked)."""
    return JSONBytes({"status": "ok"})


@router.get(
    "/readyz",
    response_model=Ready,
    response_class=JSONBytes,
    tags=["health"],
    responses={503: {"model": ErrorBody, "description": "Redis does not answer"}},
)
async def readyz(request: Request, svc: ServicesDep) -> Response:
    """Ready to serve: Redis answers and a model is loaded; 503 (with Retry-After) otherwise.

    With NEXTACT_API_KEYS set, only a request carrying a valid key gets the details (model version, Redis
    address, error text); others get the status alone.
    """
    detail = is_authenticated(request)
    try:
        await svc.store.ping()
    except StoreUnavailable as e:
        return error_response(
            503,
            "not_ready",
            str(e) if detail else "not ready: Redis does not answer",
            headers={"Retry-After": str(svc.settings.retry_after_seconds)},
        )
    if not detail:
        return JSONBytes({"status": "ready"})
    return JSONBytes(
        {
            "status": "ready",
            "model_version": svc.models.current.version,
            "redis": svc.redis.address,
            "embedded_redis": svc.redis.embedded,
        }
    )
