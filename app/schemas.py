"""Request and response bodies of the HTTP API, each field described with an example for /docs.

String lengths, timestamp range and batch sizes depend on settings, so they are checked in routes.py
(errors look the same as these models' own validation errors).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, WithJsonSchema


def epoch_or_iso(value: Any) -> float:
    """A JSON number (epoch seconds) or an ISO-8601 string (no zone = UTC) as epoch seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range (~1.8e308)
            raise ValueError("out of range: epoch seconds must be a finite number") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    raise ValueError("must be epoch seconds (a number) or an ISO-8601 date-time string")


Timestamp = Annotated[
    float,
    BeforeValidator(epoch_or_iso),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]}),
]

_TS_DESC = (
    "When the event happened: epoch seconds (number) or an ISO-8601 string (no zone = UTC). "
    "Default: the time the server received it. Windows are ordered by it."
)
_ID_DESC = (
    "The client's id for this event. An id already in the user's window is not stored again, so re-sending "
    "is safe. Default: the server assigns one."
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventIn(_Model):
    """One event of the user named in the path."""

    action: str = Field(min_length=1, description="What the user did (any string).", examples=["cart"])
    timestamp: Timestamp | None = Field(None, description=_TS_DESC, examples=[1511848894.0])
    event_id: str | None = Field(None, min_length=1, description=_ID_DESC, examples=["evt-000123"])


class EventBatch(_Model):
    """Several events of the user named in the path, in any order."""

    events: list[EventIn] = Field(
        min_length=1,
        description="The events (at most NEXTACT_MAX_EVENTS_PER_REQUEST).",
        examples=[[{"action": "pv", "timestamp": 1511848894}, {"action": "cart", "timestamp": 1511848950}]],
    )


# Union members are chosen by shape, so a validation error names the field, not both alternatives.
EVENT_TAG, BATCH_TAG = "event", "batch"
UNION_TAGS = frozenset({EVENT_TAG, BATCH_TAG})


def _event_or_batch(value: Any) -> str | None:
    if isinstance(value, dict):
        return BATCH_TAG if "events" in value else EVENT_TAG
    if isinstance(value, EventBatch | EventIn):
        return BATCH_TAG if isinstance(value, EventBatch) else EVENT_TAG
    return None


UserEventsBody = Annotated[
    Annotated[EventIn, Tag(EVENT_TAG)] | Annotated[EventBatch, Tag(BATCH_TAG)],
    Discriminator(
        _event_or_batch,
        custom_error_type="invalid_body",
        custom_error_message='expected one event object or {"events": [...]}',
    ),
]


class BulkEventIn(EventIn):
    """One event of any user."""

    user_id: str = Field(min_length=1, description="Whose event it is.", examples=["u-42"])


class BulkEvents(_Model):
    """Events of many users; each user's events keep their relative order."""

    events: list[BulkEventIn] = Field(
        min_length=1,
        description="The events (at most NEXTACT_MAX_EVENTS_PER_REQUEST).",
        examples=[
            [
                {"user_id": "u-42", "action": "pv", "timestamp": 1511848894},
                {"user_id": "u-7", "action": "buy", "timestamp": "2017-11-28T06:01:34Z", "event_id": "e-9"},
            ]
        ],
    )


_LIVE_EXAMPLE = {
    "events_scored": 1520,
    "hr@1": 0.31,
    "hr@5": 0.58,
    "hr@10": 0.69,
    "hr@20": 0.78,
    "mrr@20": 0.43,
    "unknown_rate": 0.02,
}


class ActionProbability(BaseModel):
    action: str = Field(description="A next action the model can predict.", examples=["buy"])
    probability: float = Field(ge=0, le=1, description="Its probability under the model.", examples=[0.4213])


class UserPrediction(BaseModel):
    """The model's next-action distribution for one user's current window."""

    user_id: str = Field(description="The user.", examples=["u-42"])
    model_version: str = Field(
        description="Version of the model that made this prediction.", examples=["3f9a1c0d2b7e4a65"]
    )
    served_by: Literal["live", "candidate"] = Field(
        "live",
        description="Which model answered: the live one, or the candidate (canary users only).",
        examples=["live"],
    )
    window_size: int = Field(ge=0, description="Events in the user's stored window.", examples=[12])
    unknown_actions: int = Field(
        ge=0,
        description="Events of the window whose action the model does not know (scored as unknown).",
        examples=[0],
    )
    predictions: list[ActionProbability] = Field(
        description="The k most probable next actions, most probable first (never padding or unknown).",
        examples=[[{"action": "buy", "probability": 0.42}, {"action": "cart", "probability": 0.31}]],
    )


class BulkResult(BaseModel):
    accepted: int = Field(ge=0, description="Events stored.", examples=[2])
    duplicates: int = Field(
        ge=0, description="Events skipped: their event_id was already stored.", examples=[0]
    )
    predictions: list[UserPrediction] | None = Field(
        None,
        description="With ?predict=true: one prediction per user, in order of first appearance.",
        examples=[None],
    )


class StoredEvent(BaseModel):
    action: str = Field(description="The action as sent.", examples=["cart"])
    timestamp: float = Field(description="Epoch seconds.", examples=[1511848894.0])
    event_id: str = Field(
        description="The client's id, or the one the server assigned.", examples=["evt-000123"]
    )


class UserWindow(BaseModel):
    """A user's stored window, oldest first."""

    user_id: str = Field(description="The user.", examples=["u-42"])
    events: list[StoredEvent] = Field(description="Oldest first, at most the window size.")


class ModelInfo(BaseModel):
    """What is being served."""

    model_version: str = Field(description="Content hash of model.onnx.", examples=["3f9a1c0d2b7e4a65"])
    created_at: datetime = Field(
        description="When the artifact was trained.", examples=["2026-11-28T00:00:00Z"]
    )
    cell: Literal["lstm", "gru"] = Field(description="Recurrent cell.", examples=["lstm"])
    window: int = Field(description="Events the model looks back on.", examples=[50])
    window_size: int = Field(
        description="Events stored per user (NEXTACT_WINDOW_SIZE or the model's window).", examples=[50]
    )
    vocabulary_size: int = Field(description="Actions including <pad> and <unk>.", examples=[6])
    embedding_dim: int = Field(description="Embedding width.", examples=[64])
    hidden_dim: int = Field(description="Recurrent state width.", examples=[128])
    num_layers: int = Field(description="Stacked recurrent layers.", examples=[1])
    metrics: dict[str, dict[str, dict[str, float]]] = Field(
        description="Offline metrics: metrics[protocol][scorer][metric].",
        examples=[{"full": {"model": {"hr@10": 0.61}, "popularity": {"hr@10": 0.42}}}],
    )
    execution_provider: str = Field(
        description="ONNX Runtime provider actually running the model.", examples=["CPUExecutionProvider"]
    )
    providers: list[str] = Field(
        description="The session's provider list, in priority order.", examples=[["CPUExecutionProvider"]]
    )
    device: Literal["auto", "cpu", "cuda"] = Field(description="NEXTACT_DEVICE.", examples=["auto"])
    inference_on: Literal["thread", "loop"] = Field(
        description="Where micro-batches run (NEXTACT_INFERENCE_ON, auto resolved at start-up): the inference "
        "thread or the event loop's own thread.",
        examples=["loop"],
    )
    inference_on_reason: str = Field(
        description="Why: set by NEXTACT_INFERENCE_ON, or what auto found.",
        examples=["auto: 2 usable CPUs (at most 2), the model on the CPU"],
    )
    artifact_dir: str = Field(description="Where the artifact was loaded from.", examples=["artifacts/demo"])
    embedded_redis: bool = Field(
        description="True when windows live in the embedded development Redis (private to this host).",
        examples=[False],
    )
    live_metrics: dict[str, float] | None = Field(
        None,
        description="Live quality of this model in this process (NEXTACT_LIVE_QUALITY): posted events scored "
        "against the prediction served before them; same definitions as metrics['full']['model'].",
        examples=[_LIVE_EXAMPLE],
    )
    candidate: CandidateInfo | None = Field(
        None, description="The candidate model beside it, if any.", examples=[None]
    )


class CandidateInfo(BaseModel):
    """A candidate model served beside the live one."""

    model_version: str = Field(description="Content hash of its model.onnx.", examples=["7c21e0b9a4d35f18"])
    mode: Literal["shadow", "canary"] = Field(description="NEXTACT_CANDIDATE_MODE.", examples=["shadow"])
    share: float = Field(
        description="Canary: the share of users it answers (NEXTACT_CANDIDATE_SHARE).", examples=[0.05]
    )
    window: int = Field(description="Events it looks back on.", examples=[50])
    vocabulary_size: int = Field(description="Its actions including <pad> and <unk>.", examples=[6])
    artifact_dir: str = Field(description="Where it was loaded from.", examples=["artifacts/candidate"])
    metrics: dict[str, dict[str, dict[str, float]]] = Field(
        description="Its offline metrics (manifest).", examples=[{"full": {"model": {"hr@10": 0.66}}}]
    )
    live_metrics: dict[str, float] | None = Field(
        None, description="Its live quality in this process.", examples=[_LIVE_EXAMPLE]
    )


class PromoteResult(BaseModel):
    """The candidate is now the live model, for every request from now on."""

    model_version: str = Field(
        description="The model now live (the former candidate).", examples=["7c21e0b9a4d35f18"]
    )
    previous_version: str = Field(description="The model it replaced.", examples=["3f9a1c0d2b7e4a65"])


class QualityPoint(BaseModel):
    time: float = Field(description="When the snapshot was taken (epoch seconds).", examples=[1764518400.0])
    models: dict[str, dict[str, float]] = Field(
        description="model version -> live figures at that time.",
        examples=[{"3f9a1c0d2b7e4a65": _LIVE_EXAMPLE}],
    )


class QualityHistory(BaseModel):
    """Periodic snapshots of the live figures (NEXTACT_QUALITY_SNAPSHOT_SECONDS), oldest first."""

    live_version: str = Field(description="The live model now.", examples=["3f9a1c0d2b7e4a65"])
    candidate_version: str | None = Field(description="The candidate now, if any.", examples=[None])
    points: list[QualityPoint] = Field(description="The snapshots, oldest first.")


class ReloadResult(BaseModel):
    """A reload that succeeded: the new model serves every prediction from now on."""

    model_version: str = Field(description="The model now being served.", examples=["7c21e0b9a4d35f18"])
    previous_version: str = Field(description="The model it replaced.", examples=["3f9a1c0d2b7e4a65"])
    seconds: float = Field(description="Time to load and self-check the new artifact.", examples=[0.42])


class Health(BaseModel):
    status: str = Field(description="ok (alive) or ready.", examples=["ok"])


class Ready(BaseModel):
    """Readiness; with authentication on, the details are only given to a request carrying a valid key."""

    status: str = Field(description="ready", examples=["ready"])
    model_version: str | None = Field(
        None, description="The model being served.", examples=["3f9a1c0d2b7e4a65"]
    )
    redis: str | None = Field(
        None, description="Address of the Redis being used.", examples=["127.0.0.1:6399"]
    )
    embedded_redis: bool | None = Field(
        None,
        description="True when that Redis is the embedded development server (NEXTACT_EMBEDDED_REDIS).",
        examples=[False],
    )


class FieldError(BaseModel):
    field: str = Field(
        description="Where: body.events[0].action, query.k, path.user_id ...",
        examples=["body.events[0].action"],
    )
    message: str = Field(description="What is wrong with it.", examples=["Field required"])


class ErrorBody(BaseModel):
    """Every error answer has this shape."""

    error: str = Field(description="Machine-readable code.", examples=["validation_error"])
    message: str = Field(
        description="What went wrong, naming the field, limit or server.",
        examples=["body.events[0].action: Field required"],
    )
    fields: list[FieldError] | None = Field(
        None,
        description="Validation errors, one per field (422 only).",
        examples=[[{"field": "body.events[0].action", "message": "Field required"}]],
    )
