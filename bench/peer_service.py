"""The peer in the service benchmark: nextact's model and Redis windows served the way a Python team would with
BentoML, its adaptive batching on. Runs only in the peer's own virtual environment (bench/peer_env.py makes it):

    bench/.venv-peer/bin/bentoml serve bench.peer_service:Peer --host 127.0.0.1 --port 8103

Configured by environment (read when BentoML imports this module, as its service definitions are):
PEER_ARTIFACT_DIR (model.onnx + manifest.json), PEER_REDIS_URL, PEER_KEY_PREFIX (default nextact: the
same windows a nextact population has), PEER_TTL_SECONDS (30 days), PEER_MAX_BATCH_SIZE (64, nextact's
NEXTACT_BATCH_MAX_SIZE default), PEER_MAX_LATENCY_MS (10000: BentoML's latency budget; a request waiting
longer is refused with 503, so this is set above any queueing the closed loop causes),
PEER_INTRA_OP_THREADS (0: ONNX Runtime's default, as nextact's).

What it does per batch of requests (BentoML's dispatcher forms the batch; one batch at a time, in one
thread): nextact's append script for every request's user in one Redis pipeline (bench/peer_window.py),
then one ONNX Runtime call over the windows, then the top k. The HTTP surface is nextact's hot route,
`POST /v1/users/{user_id}/events?k=10` with one event, answered with the same JSON object: a batchable
BentoML API takes its parameter, a list, in a JSON object (`{"items": [...]}`) and answers a list, so a
small ASGI middleware (WireShape) puts the path's user, the query's k and the body into a one-item list on
the way in and takes the object out of the one-item list on the way out. It does not import app/.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import BaseModel, Field

from bench.peer_window import PeerEvent, PeerWindows

MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "64"))
MAX_LATENCY_MS = int(os.environ.get("PEER_MAX_LATENCY_MS", "10000"))
ROUTE = "/v1/users/{user_id}/events"


class EventItem(BaseModel):
    """One request: the user and k from the URL, the event from the body."""

    user_id: str = Field(min_length=1)
    k: int = Field(10, ge=1)
    action: str = Field(min_length=1)
    event_id: str | None = Field(None, min_length=1)
    timestamp: float | None = None


class ActionProbability(BaseModel):
    action: str
    probability: float


class UserPrediction(BaseModel):
    """nextact's response to the same request, field for field."""

    user_id: str
    model_version: str
    served_by: str = "live"
    window_size: int
    unknown_actions: int
    predictions: list[ActionProbability]


class WireShape:
    """Pure ASGI: nextact's request shape in, BentoML's batchable list shape through, nextact's shape out."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/users/") and path.endswith("/events")):
            await self.app(scope, receive, send)
            return
        user_id = path[len("/v1/users/") : -len("/events")]
        k = 10
        for pair in scope.get("query_string", b"").decode().split("&"):
            name, _, value = pair.partition("=")
            if name == "k" and value.isdigit():
                k = int(value)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks).strip()
        if body.startswith(b"{") and body.endswith(b"}") and len(body) > 2:
            head = json.dumps({"user_id": user_id, "k": k}).encode()[:-1]  # '{"user_id": ..., "k": 10'
            body = b'{"items":[' + head + b"," + body[1:] + b"]}"
        sent = False

        async def receive_once() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        start: dict[str, Any] | None = None
        parts: list[bytes] = []

        async def unwrap(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            out = b"".join(parts)
            if start["status"] == 200 and out.startswith(b"[") and out.endswith(b"]"):
                out = out[1:-1]
            headers = [(n, v) for n, v in start.get("headers", []) if n.lower() != b"content-length"]
            headers.append((b"content-length", str(len(out)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": out})

        await self.app(scope, receive_once, unwrap)


@bentoml.service(workers=1, traffic={"timeout": 60})
class Peer:
    """Redis window + ONNX Runtime + top-k, batched by BentoML's adaptive batching."""

    def __init__(self) -> None:
        import onnxruntime as ort
        import redis

        art = Path(os.environ["PEER_ARTIFACT_DIR"])
        m = json.loads((art / "manifest.json").read_text())
        options = ort.SessionOptions()  # nextact's session options (app/model.py), so the runtime is equal
        options.log_severity_level = 3
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        threads = int(os.environ.get("PEER_INTRA_OP_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(art / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        io = {
            "action_ids": "action_ids",
            "lengths": "lengths",
            "probabilities": "probabilities",
            **m.get("io", {}),
        }
        self.inputs, self.output = (io["action_ids"], io["lengths"]), io["probabilities"]
        self.version, self.window = m["model_version"], int(m["window"])
        self.pad, self.unk = int(m.get("pad_id", 0)), int(m.get("unk_id", 1))
        self.right = m.get("padding_side", "right") == "right"
        self.tokens = np.array(m["vocabulary"], dtype=object)
        self.special = [self.pad, self.unk]
        self.index = {a: i for i, a in enumerate(m["vocabulary"]) if i not in self.special}
        client = redis.Redis.from_url(os.environ["PEER_REDIS_URL"])
        self.windows = PeerWindows(
            client,
            os.environ.get("PEER_KEY_PREFIX", "nextact"),
            int(os.environ.get("PEER_TTL_SECONDS", str(30 * 24 * 3600))),
            self.window,
        )
        self.windows.load()

    @bentoml.api(route=ROUTE, batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def events(self, items: list[EventItem]) -> list[dict[str, Any]]:
        """Store each request's event in its user's window and predict the user's next actions."""
        now = time.time()
        events = [
            PeerEvent(
                it.user_id,
                it.event_id or uuid.uuid4().hex,
                it.action,
                now if it.timestamp is None else it.timestamp,
            )
            for it in items
        ]
        windows = self.windows.append_many(events)
        longest = max(1, max(len(w) for w in windows))
        ids = np.full((len(windows), longest), self.pad, dtype=np.int64)  # (B, T)
        lengths = np.empty(len(windows), dtype=np.int64)  # (B,)
        unknown = []
        for i, w in enumerate(windows):
            row = [self.index.get(a, self.unk) for a in w[-self.window :]]
            lengths[i] = len(row)
            unknown.append(row.count(self.unk))
            if row:
                if self.right:
                    ids[i, : len(row)] = row
                else:
                    ids[i, longest - len(row) :] = row
        (probs,) = self.session.run([self.output], {self.inputs[0]: ids, self.inputs[1]: lengths})
        probs[:, self.special] = -1.0  # (B, V); never predict padding or unknown
        k = min(max(it.k for it in items), probs.shape[1] - len(self.special))
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]  # (B, k) unordered
        values = np.take_along_axis(probs, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        top, values = np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)
        # plain dicts, not UserPrediction models: BentoML 1.4 builds the output type's JSON schema on every
        # response (IOMixin.mime_type), which for a list of models costs more than the model itself
        return [
            UserPrediction(
                user_id=it.user_id,
                model_version=self.version,
                window_size=len(w),
                unknown_actions=unknown[i],
                predictions=[
                    ActionProbability(action=a, probability=float(p))
                    for a, p in zip(self.tokens[top[i, : it.k]], values[i, : it.k], strict=False)
                ],
            ).model_dump()
            for i, (it, w) in enumerate(zip(items, windows, strict=True))
        ]


Peer.add_asgi_middleware(WireShape)  # type: ignore[attr-defined]
