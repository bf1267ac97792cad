"""The ASGI middlewares: RequestTimeout (the HTTP request timeout the service puts in place of BentoML's), the infer
lane's choice of targets, and the watch for a multipart body's close delimiter."""

import asyncio
import gc
import json
from collections.abc import AsyncIterator

import pytest

from serving.asgi import RequestTimeout, _watch_close_delimiter


def respond_after(delay_before_start: float, delay_before_body: float = 0.0, log: list | None = None):
    """An ASGI app that starts its response after one delay and sends the body after another."""
    async def app(scope, receive, send):
        try:
            await asyncio.sleep(delay_before_start)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await asyncio.sleep(delay_before_body)
            await send({"type": "http.response.body", "body": b"ok"})
        except asyncio.CancelledError:
            if log is not None:
                log.append("cancelled")
            raise

    return app


async def call(app, timeout: float) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    await RequestTimeout(app, timeout)({"type": "http"}, None, send)
    return sent


def live_timers() -> int:
    return sum(isinstance(o, asyncio.TimerHandle) and not o.cancelled() for o in gc.get_objects())


def test_a_fast_request_passes_and_leaves_no_timer_behind():
    async def main():
        before = live_timers()
        sent = [await call(respond_after(0), timeout=60) for _ in range(50)]
        return before, live_timers(), sent

    before, after, sent = asyncio.run(main())
    assert all(s[0]["status"] == 200 and s[1]["body"] == b"ok" for s in sent)
    assert after == before  # BentoML's TimeoutMiddleware left 50 timers of 60 s here


def test_a_request_that_does_not_start_in_time_gets_504_and_its_handler_is_cancelled():
    log: list[str] = []

    async def main():
        return await call(respond_after(5, log=log), timeout=0.05)

    sent = asyncio.run(main())
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {"error": "not able to process the request in 0.05 seconds"}
    assert log == ["cancelled"]


def test_a_response_that_started_in_time_is_finished_not_cut():
    async def main():
        return await call(respond_after(0, delay_before_body=0.1), timeout=0.05)

    sent = asyncio.run(main())
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"ok"


def test_the_apps_own_timeout_error_is_its_error_not_a_504():
    async def app(scope, receive, send):
        raise TimeoutError("the app's own")

    with pytest.raises(TimeoutError, match="the app's own"):
        asyncio.run(call(app, timeout=60))


def test_the_infer_lane_takes_oip_infer_targets_only_and_passes_the_path_parameters():
    """The lane admitted OIP infer requests take past BentoML's stack: the endpoint, under the request timeout."""
    from serving.oip_rest import infer_lane

    seen = []

    async def endpoint(scope, receive, send):
        seen.append(scope["path_params"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    route = infer_lane(endpoint, timeout_s=60)
    assert route(b"/v2/models/ready/ready") is None and route(b"/v2/models/a/b/c/infer") is None
    app = route(b"/v2/models/mnist%2Dcnn/versions/2/infer?x=1")
    assert isinstance(app, RequestTimeout)
    asyncio.run(app({"type": "http", "path": "/v2/models/mnist-cnn/versions/2/infer"}, None, _ignore))
    asyncio.run(route(b"/v2/models/m/infer")({"type": "http", "path": "/v2/models/m/infer"}, None, _ignore))
    assert seen == [{"model": "mnist-cnn", "version": "2"}, {"model": "m"}]


async def _ignore(message):
    pass


def test_the_app_bentoml_builds_times_requests_out_with_ours_not_bentomls():
    from serving.service import SETTINGS, CnnServe

    stack = CnnServe.to_asgi().user_middleware  # the HTTP app exactly as BentoML builds it for a worker
    ours = [m for m in stack if m.cls is RequestTimeout]
    assert len(ours) == 1 and ours[0].kwargs["timeout"] == SETTINGS.request_timeout_s
    assert not [m for m in stack if m.cls.__name__ == "TimeoutMiddleware"]  # its 60 s timers are not back


async def _closed_after(chunks: list[bytes], boundary: bytes = b"Bd") -> list[bool]:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    closed: list[bool] = []
    assert [chunk async for chunk in _watch_close_delimiter(stream(), boundary, closed)] == chunks  # passed through
    return closed


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000])
def test_the_close_delimiter_is_found_whatever_the_chunks_and_only_at_a_line_start(size):
    form = b'--Bd\r\nContent-Disposition: form-data; name="model"\r\n\r\nmnist-cnn\r\n--Bd--\r\nepilogue'
    def split(body: bytes) -> list[bytes]:
        return [body[i:i + size] for i in range(0, len(body), size)]
    assert asyncio.run(_closed_after(split(form))) == [True]
    assert asyncio.run(_closed_after(split(form[:form.index(b"\r\n--Bd--")]))) == [False]  # cut before it
    assert asyncio.run(_closed_after(split(form.replace(b"\r\n--Bd--", b"x--Bd--")))) == [False]  # not a line start
    assert asyncio.run(_closed_after(split(b"--Bd--\r\n"))) == [True]  # a form of no parts
