"""/docs and /redoc work offline: their pages load scripts and styles from the service, never from a CDN."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.anyio


async def test_docs_pages_load_only_local_assets(tmp_path: Path) -> None:
    app = create_app(Settings(artifact_dir=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nextact") as client:
        for page, needed in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            html = (await client.get(page)).text
            urls = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert any(u.endswith(needed) for u in urls), (page, urls)
            assert all(u.startswith("/") for u in urls), f"{page} loads from elsewhere: {urls}"
            assert "cdn." not in html and "fonts.googleapis" not in html, page
            for url in urls:
                asset = await client.get(url)
                assert asset.status_code == 200 and len(asset.content) > 1000, url
        swagger = (await client.get("/docs-assets/swagger-ui-bundle.js")).text
        version = re.search(r'"(5\.\d+\.\d+)"', swagger)
        assert version, "Swagger UI 5 (the first to render OpenAPI 3.1, which FastAPI writes)"
        schema = (await client.get("/openapi.json")).json()
        assert schema["openapi"].startswith("3.1") and not any(p.startswith("/docs") for p in schema["paths"])
        oauth = await client.get("/docs/oauth2-redirect")
        assert oauth.status_code == 200
