"""Small ASGI helpers for the apps mounted into the BentoML service."""

from __future__ import annotations

import json
from typing import Any


class MountRoots:
    """Serve a mounted app's bare path (``GET /v2``, which perf_analyzer asks for) as its root (``/v2/``)
    instead of answering with a redirect."""

    def __init__(self, app: Any, paths: tuple[str, ...]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope["path"].encode() + b"/"}
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies whose Content-Length is over ``limit`` with 413, before anything reads them."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                body = json.dumps({"error": f"request body of {int(length)} bytes is over the limit of "
                                            f"{self.limit}"}).encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
