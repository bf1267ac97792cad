"""Small ASGI helpers for the apps mounted into the BentoML service."""

from __future__ import annotations

import asyncio
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


class RequestTimeout:
    """Answer 504 when the app has not started its response within ``timeout`` seconds, and cancel it.

    The semantics of BentoML's ``TimeoutMiddleware`` (``traffic.timeout``), which ``serving.service`` swaps
    for this one: BentoML's never cancels its timer, so every request leaves a timer and a future alive for
    the whole timeout. At 2,000 requests/s and 60 s that is over 10^5 of each, and every full garbage
    collection walks them all, stopping the event loop for about 100 ms (serving/README.md, "HTTP tail")."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = asyncio.get_running_loop().create_future()

        async def send_and_mark(message: dict) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, send_and_mark))
        try:  # asyncio.wait cancels its own timer when it returns
            await asyncio.wait((app, started), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            if not started.done() and not app.done():
                app.cancel()
                message = f"not able to process the request in {self.timeout:g} seconds"
                await send({"type": "http.response.start", "status": 504,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": json.dumps({"error": message}).encode()})
                return
            await app
        except asyncio.CancelledError:  # the server dropped the request: do not leave the app running
            app.cancel()
            raise
