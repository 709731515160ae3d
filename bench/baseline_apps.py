"""The two servers nextact is measured against, served with the same uvicorn settings as `python -m app`.

    python bench/baseline_apps.py ceiling --port 8101
    python bench/baseline_apps.py torch --port 8102 --artifact-dir artifacts/beauty --redis-url redis://...

ceiling  bare FastAPI: the same route, the same request body model (validated), answers a UserPrediction of
         the same shape and size rendered the same way, and does nothing else: no Redis, no model, no
         middleware. What one uvicorn worker can do at all for this request.
torch    the same application as nextact (create_app: routes, middleware, the Redis window script), with
         the model replaced by PyTorch eager on checkpoint.pt, called inline per request (no batching, no
         ONNX Runtime): the service anyone could write in an afternoon. One torch thread by default, its
         fastest setting next to an event loop on a small machine (see --torch-threads).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvicorn
from fastapi import FastAPI, Query, Response

from app.errors import JSONBytes
from app.schemas import UserEventsBody, UserPrediction

UVICORN = {"loop": "uvloop", "http": "httptools", "workers": 1, "access_log": False}  # `python -m app` resolves
# loop/http "auto" to these when uvloop and httptools are installed (uvicorn[standard])


# ---- ceiling ------------------------------------------------------------------------------------------------

def ceiling_app(k_default: int = 10) -> FastAPI:
    app = FastAPI()
    actions = [str(100_000 + i) for i in range(1000)]  # item-id-like strings, like Beauty's

    @app.post("/v1/users/{user_id}/events", response_model=UserPrediction, response_class=JSONBytes)
    async def post_user_events(user_id: str, body: UserEventsBody,
                               k: Annotated[int | None, Query(ge=1)] = None) -> Response:
        kk = k or k_default
        return JSONBytes({
            "user_id": user_id, "model_version": "0123456789abcdef", "window_size": 50, "unknown_actions": 0,
            "predictions": [{"action": actions[(len(user_id) + i) % 1000], "probability": 0.0123456789 / (i + 1)}
                            for i in range(kk)],
        })

    return app


# ---- PyTorch eager, no batching -----------------------------------------------------------------------------

class TorchModel:
    """Stands where app.model.ServingModel stands: encode, one forward per request, torch.topk, decode."""

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

    def predict(self, requests: list[tuple[list[str], int]]) -> list[Any]:
        from app.model import Prediction

        torch, out = self.torch, []
        for actions, k in requests:
            actions = actions[-self.manifest.window :]
            ids = [self.index.get(a, 1) for a in actions]
            x = torch.tensor([ids or [0]], dtype=torch.long)  # (1, T)
            with torch.inference_mode():
                probs = self.net(x, torch.tensor([len(ids)]))[0]  # (V,)
                p, top = torch.topk(probs, min(k, self.vocab_size - 2))
            out.append(Prediction(self.version, ids.count(1), [self.tokens[i] for i in top.tolist()], p.tolist()))
        return out


@dataclass
class InlineTorch:
    """In place of the micro-batcher: every prediction runs at once, on the event loop, on its own."""

    model: TorchModel

    async def submit(self, item: tuple[list[str], int]) -> Any:
        return self.model.predict([item])[0]

    async def close(self) -> None:
        return None


def torch_app(artifact_dir: Path, threads: int) -> FastAPI:
    from app.deps import Services
    from app.main import create_app
    from app.model import ModelHolder
    from app.redis_client import connect
    from app.settings import get_settings
    from app.windows import WindowStore

    settings = get_settings()
    model = TorchModel(artifact_dir, threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if settings.redis_url is None:
                raise SystemExit("the torch variant needs NEXTACT_REDIS_URL")
            redis = connect(settings.redis_url, settings.redis_max_connections, settings.redis_timeout_seconds,
                            settings.redis_retries)
            stack.push_async_callback(redis.close)
            store = WindowStore(redis.client, settings.key_prefix, settings.window_ttl_seconds, redis.address)
            await store.load_script()
            holder = ModelHolder(cast(Any, model))
            app.state.services = Services(settings, holder, redis, store, cast(Any, InlineTorch(model)))
            yield

    app = create_app(settings)
    app.router.lifespan_context = lifespan
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["ceiling", "torch"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--artifact-dir", type=Path, default=ROOT / "artifacts" / "beauty")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads (0 = torch's default: one per core, which on a shared 2-core "
                        "machine makes every call wait for a busy core, hundreds of times slower)")
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
