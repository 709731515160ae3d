"""`python -m app`: serve with uvicorn (uvloop and httptools where installed), configured by NEXTACT_* variables."""

from __future__ import annotations

import logging
import logging.config
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from app.manifest import MODEL_FILE, ManifestError, read_manifest
from app.observability import MULTIPROC_ENV, logging_config
from app.redis_server import EmbeddedRedis, EmbeddedRedisError
from app.settings import EMBEDDED_URL_ENV, get_settings, redis_problem

log = logging.getLogger("nextact")


def main() -> int:
    settings = get_settings()
    log_config = logging_config(settings.log_level)  # JSON lines; uvicorn applies it in every worker too
    logging.config.dictConfig(log_config)
    # fail before forking workers when the artifact is obviously unusable (the lifespan checks it fully)
    try:
        read_manifest(settings.artifact_dir)
    except ManifestError as e:
        log.critical("cannot start: %s", e)
        return 2
    if not (settings.artifact_dir / MODEL_FILE).is_file():
        log.critical("cannot start: %s: model file not found", settings.artifact_dir / MODEL_FILE)
        return 2
    problem = redis_problem(settings)
    if problem is not None:
        log.critical("cannot start: %s", problem)
        return 2
    embedded = None
    if settings.redis_url is None and settings.workers > 1:
        # one embedded server for all workers, owned by this parent process
        embedded = EmbeddedRedis(
            settings.data_dir,
            port=settings.embedded_redis_port,
            appendfsync=settings.embedded_redis_appendfsync,
        )
        try:
            embedded.start()
        except EmbeddedRedisError as e:
            log.critical("cannot start: %s", e)
            return 2
        os.environ["NEXTACT_REDIS_URL"] = embedded.url
        os.environ[EMBEDDED_URL_ENV] = (
            embedded.url
        )  # so the workers' /readyz and /v1/model say it is embedded
    metrics_dir = (
        _multiprocess_metrics_dir() if settings.workers > 1 or os.environ.get(MULTIPROC_ENV) else None
    )
    log.info("nextact serving on http://%s:%d (docs at /docs)", settings.host, settings.port)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler it found:
    # a no-op here lets a clean shutdown exit 0 (and skips KeyboardInterrupt's traceback)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        from app.http_server import GuardedHttpToolsProtocol

        http: Any = GuardedHttpToolsProtocol
    except ImportError:  # no httptools on this platform: h11 bounds the head's size, but nothing times it out
        log.warning(
            "httptools is not installed: request heads and bodies are not timed out "
            "(NEXTACT_HTTP_HEADER_TIMEOUT_SECONDS / NEXTACT_HTTP_BODY_TIMEOUT_SECONDS)"
        )
        http = "h11"
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level.lower(),
            access_log=False,
            log_config=log_config,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
            # X-Forwarded-For / -Proto only from the configured proxies (default: none)
            proxy_headers=bool(settings.forwarded_allow_ips.strip()),
            forwarded_allow_ips=settings.forwarded_allow_ips.strip() or None,
            timeout_keep_alive=settings.http_keep_alive_seconds,
            http=http,
            h11_max_incomplete_event_size=settings.http_max_header_bytes,
            server_header=False,  # no "server: uvicorn" on every answer
        )
    finally:
        if embedded is not None:
            embedded.stop()
        if metrics_dir is not None and metrics_dir.owned:
            shutil.rmtree(metrics_dir.path, ignore_errors=True)
    return 0


@dataclass(frozen=True)
class _MetricsDir:
    path: Path
    owned: bool  # created here (removed at exit), or the operator's PROMETHEUS_MULTIPROC_DIR (kept, emptied)


def _multiprocess_metrics_dir() -> _MetricsDir:
    """An empty prometheus-client multiprocess directory for the workers, set in their environment.

    The operator's PROMETHEUS_MULTIPROC_DIR is used (emptied of an earlier run's files) when set; else a
    temporary directory is created and removed at exit.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path, owned = Path(given), False
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path, owned = Path(tempfile.mkdtemp(prefix="nextact-metrics-")), True
        os.environ[MULTIPROC_ENV] = str(path)
    log.info("metrics of all %s workers merged through %s", get_settings().workers, path)
    return _MetricsDir(path, owned)


if __name__ == "__main__":
    # `python -m app [flags]` is `nextact serve [flags]`: --help prints help, flags override NEXTACT_* variables
    from app.cli import main as cli_main

    sys.exit(cli_main(["serve", *sys.argv[1:]]))
