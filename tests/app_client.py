"""Helpers for the service's end-to-end tests: the real app with its lifespan, driven over HTTP by httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings


def settings_for(artifact: Path, redis_url: str | None, **overrides: Any) -> Settings:
    return Settings(artifact_dir=artifact, redis_url=redis_url, **overrides)


@asynccontextmanager
async def running_app(
    artifact: Path, redis_url: str | None, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Start the app (lifespan included) and yield it with a client talking HTTP to it in-process."""
    app = create_app(settings_for(artifact, redis_url, **overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nextact", timeout=30) as client:
            yield app, client


def probabilities(body: dict[str, Any]) -> dict[str, float]:
    """action -> probability of a prediction answer."""
    return {p["action"]: p["probability"] for p in body["predictions"]}
