"""Two of the servers nextact is measured against, served with the same uvicorn settings as `python -m app`
(the third, the BentoML peer, is bench/peer_service.py).

    python bench/baseline_apps.py ceiling --port 8101
    NEXTACT_REDIS_URL=redis://... python bench/baseline_apps.py torch --port 8102 --artifact-dir artifacts/beauty

ceiling  bare FastAPI: the same route, the same request body model (validated), answers a UserPrediction of
         the same shape and size rendered the same way, and does nothing else: no Redis, no model, no
         middleware. What one uvicorn worker can do at all for this request.
torch    the same application as nextact (create_app and its lifespan: routes, middleware, metrics, the Redis
         window script, the worker thread), with the model replaced by PyTorch eager on checkpoint.pt and
         batching off (NEXTACT_BATCH_MAX_SIZE=1) and no live quality: one forward per request, no ONNX Runtime. The service
         anyone could write in an afternoon. One torch thread by default, its fastest setting next to an
         event loop on a small machine (see --torch-threads).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvicorn
from fastapi import FastAPI, Query, Response

from app.errors import JSONBytes
from app.schemas import UserEventsBody, UserPrediction

UVICORN = {
    "loop": "uvloop",
    "http": "httptools",
    "workers": 1,
    "access_log": False,
}  # `python -m app` resolves
# loop/http "auto" to these when uvloop and httptools are installed (uvicorn[standard])


# ---- ceiling ------------------------------------------------------------------------------------------------


def ceiling_app(k_default: int = 10) -> FastAPI:
    app = FastAPI()
    actions = [str(100_000 + i) for i in range(1000)]  # item-id-like strings, like Beauty's

    @app.post("/v1/users/{user_id}/events", response_model=UserPrediction, response_class=JSONBytes)
    async def post_user_events(
        user_id: str, body: UserEventsBody, k: Annotated[int | None, Query(ge=1)] = None
    ) -> Response:
        kk = k or k_default
        return JSONBytes(
            {
                "user_id": user_id,
                "model_version": "0123456789abcdef",
                "window_size": 50,
                "unknown_actions": 0,
                "predictions": [
                    {"action": actions[(len(user_id) + i) % 1000], "probability": 0.0123456789 / (i + 1)}
                    for i in range(kk)
                ],
            }
        )

    return app


# ---- PyTorch eager, no batching -----------------------------------------------------------------------------


class TorchModel:
    """Stands where app.model.ServingModel stands: encode, one forward per window, torch.topk, decode."""

    def __init__(self, artifact_dir: Path, threads: int) -> None:
        import torch

        from app.manifest import read_manifest
        from training.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.manifest = read_manifest(artifact_dir)
        self.net, vocab = load_checkpoint(artifact_dir)
        if list(vocab.tokens) != self.manifest.vocabulary:
            raise SystemExit(f"{artifact_dir}: checkpoint.pt and manifest.json have different vocabularies")
        self.tokens = vocab.tokens
        self.index = {t: i for i, t in enumerate(vocab.tokens) if i > 1}
        self.artifact_dir = artifact_dir
        self.version = self.manifest.model_version
        self.vocab_size = self.manifest.vocab_size
        self.provider = f"torch-{torch.__version__}-eager-cpu"
        self.providers = [self.provider]
        self.device = "cpu"
        self.step = None  # no step graph: the app recomputes the window

    def knows(self, action: str) -> bool:
        return action in self.index

    def predict(self, requests: list[tuple[Any, ...]]) -> list[Any]:
        """(actions, k[, filters]) each; filters are not supported (the benchmark sends none)."""
        from app.model import Prediction

        torch, out = self.torch, []
        for actions, k, *_ in requests:
            actions = actions[-self.manifest.window :]
            ids = [self.index.get(a, 1) for a in actions]
            x = torch.tensor([ids or [0]], dtype=torch.long)  # (1, T)
            with torch.inference_mode():
                probs = self.net(x, torch.tensor([len(ids)]))[0]  # (V,)
                p, top = torch.topk(probs, min(k, self.vocab_size - 2))
            out.append(
                Prediction(self.version, ids.count(1), [self.tokens[i] for i in top.tolist()], p.tolist())
            )
        return out


def torch_app(artifact_dir: Path, threads: int) -> FastAPI:
    """nextact's create_app() and lifespan, unchanged but for two things: the model it loads is TorchModel,
    and NEXTACT_BATCH_MAX_SIZE=1, so every prediction is its own call (in the batcher's one worker thread)."""
    import app.main as service

    if not hasattr(service, "_load_checked"):
        raise SystemExit("app.main._load_checked is gone: update bench/baseline_apps.py to the new lifespan")
    os.environ["NEXTACT_BATCH_MAX_SIZE"] = "1"
    os.environ["NEXTACT_ARTIFACT_DIR"] = str(artifact_dir)
    os.environ["NEXTACT_LIVE_QUALITY"] = "false"  # an afternoon's service keeps no quality counters
    os.environ["NEXTACT_INCREMENTAL_STATE"] = "false"  # nor carried states: the whole window every request

    def load(artifact_dir: Path, *args: Any, **kwargs: Any) -> Any:
        return TorchModel(artifact_dir, threads)

    service._load_checked = load  # type: ignore[assignment]
    return service.create_app()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["ceiling", "torch"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--artifact-dir", type=Path, default=ROOT / "artifacts" / "beauty")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads (0 = torch's default: one per core, which on a shared 2-core "
        "machine makes every call wait for a busy core, hundreds of times slower)",
    )
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.variant == "ceiling":
        app = ceiling_app()
    else:
        app = torch_app(args.artifact_dir, args.torch_threads)
    started = time.monotonic()
    logging.getLogger("bench").info("%s app built in %.1fs", args.variant, time.monotonic() - started)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level=args.log_level, **UVICORN)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
