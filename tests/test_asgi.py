"""The ASGI middlewares: RequestTimeout (the HTTP request timeout the service puts in place of BentoML's), the infer
lane's choice of targets, the watch for a multipart body's close delimiter, and JsonBodies' Content-Encoding."""

import asyncio
import gc
import json
from collections.abc import AsyncIterator

import pytest

from serving.asgi import RequestTimeout, _watch_close_delimiter, receive_body


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


def _post(body_chunks: list[bytes], headers: list[tuple[bytes, bytes]], then_disconnect: bool = False):
    """(scope, receive) of a POST /predict whose body comes in ``body_chunks``."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1 or then_disconnect}
                for i, c in enumerate(body_chunks)]
    if then_disconnect:
        messages.append({"type": "http.disconnect"})

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return {"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive


async def _through_json_bodies(scope, receive, max_bytes: int = 1 << 20):
    """What the app behind ``JsonBodies`` read (body, headers), and what was sent back."""
    from serving.asgi import JsonBodies

    seen, sent = {}, []

    async def app(scope, receive, send):
        body = await receive_body(receive, None, 1 << 20)
        seen.update(body=body, headers=dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        sent.append(message)

    await JsonBodies(app, ("/predict",), max_bytes)(scope, receive, send)
    return seen, sent


def test_json_bodies_decode_a_chunked_gzip_body_with_a_bom_and_pass_on_a_plain_one():
    import gzip

    raw = b'\xef\xbb\xbf{"instances": [[0]]}'
    packed = gzip.compress(raw)
    scope, receive = _post([packed[:7], packed[7:]], [(b"content-encoding", b"GZIP"),
                                                      (b"transfer-encoding", b"chunked")])
    seen, _ = asyncio.run(_through_json_bodies(scope, receive))
    assert seen["body"] == raw[3:]  # decoded, then the byte-order mark dropped as for a plain body
    assert b"content-encoding" not in seen["headers"] and b"transfer-encoding" not in seen["headers"]
    assert seen["headers"][b"content-length"] == str(len(raw) - 3).encode()  # what the app reads
    scope, receive = _post([b'{"instances": [[0]]}'], [(b"content-encoding", b"identity")])
    assert asyncio.run(_through_json_bodies(scope, receive))[0]["body"] == b'{"instances": [[0]]}'


def test_json_bodies_answer_nothing_to_a_client_gone_mid_body_and_refuse_an_expanding_one():
    import zlib

    scope, receive = _post([zlib.compress(b"{}")[:3]], [(b"content-encoding", b"deflate")], then_disconnect=True)
    seen, sent = asyncio.run(_through_json_bodies(scope, receive))
    assert seen == {} and sent == []  # nobody to answer, nothing run
    scope, receive = _post([zlib.compress(b" " * 5000)], [(b"content-encoding", b"deflate")])
    seen, sent = asyncio.run(_through_json_bodies(scope, receive, max_bytes=1000))
    assert seen == {} and sent[0]["status"] == 413
    assert b"decodes to more than 1000 bytes" in sent[1]["body"]
