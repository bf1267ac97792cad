"""The hooks into uvicorn's httptools protocol: one write per response, probes and refusals answered at once,
the keep-alive timer, refusals without uvicorn's cycle, upgrade offers read as HTTP/1.1."""

import asyncio
import contextlib
import logging

from serving.uvicorn_hooks import install_single_write_responses


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True


def respond(keep_alive: bool, messages: list[dict], method: str = "POST") -> RecordingTransport:
    """``messages`` sent through uvicorn's httptools response cycle (with our single-write patch installed)."""
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    assert install_single_write_responses()
    transport = RecordingTransport()
    scope = {"type": "http", "method": method, "path": "/", "headers": []}
    cycle = RequestResponseCycle(scope, transport, FlowControl(transport), logging.getLogger("t"),
                                 logging.getLogger("t"), False, [], asyncio.Event(), False, keep_alive,
                                 lambda: None)

    async def run() -> None:
        for message in messages:
            await cycle.send(message)

    asyncio.run(run())
    assert cycle.transport is transport  # the stand-in is gone once the head is out
    return transport


START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}


def test_a_response_goes_out_in_one_write_head_and_body_together():
    transport = respond(True, [START, {"type": "http.response.body", "body": b"hello"}])
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200")
    assert transport.writes[0].endswith(b"\r\n\r\nhello") and not transport.closed


def test_the_held_head_is_written_before_a_closing_connection_closes():
    transport = respond(False, [START, {"type": "http.response.body", "body": b"hello"}])
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"hello") and transport.closed


def test_a_streamed_or_bodiless_response_still_sends_its_head():
    streamed = respond(True, [{"type": "http.response.start", "status": 200, "headers": []},
                              {"type": "http.response.body", "body": b"ab", "more_body": True},
                              {"type": "http.response.body", "body": b"cd"}])
    assert len(streamed.writes) == 2 and streamed.writes[0].startswith(b"HTTP/1.1 200")
    assert b"".join(streamed.writes).endswith(b"2\r\ncd\r\n0\r\n\r\n")
    head = respond(True, [START, {"type": "http.response.body", "body": b""}], method="HEAD")
    assert len(head.writes) == 1 and head.writes[0].startswith(b"HTTP/1.1 200")


class ConnectionTransport(RecordingTransport):
    """A connection's transport as uvicorn's protocol uses it: addresses, reading paused or not."""

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def connected(app) -> tuple:
    """uvicorn's httptools protocol serving ``app`` on a ``ConnectionTransport``, as the service patches it."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    config = Config(app, http="httptools", log_config=None)
    config.load()
    protocol = HttpToolsProtocol(config, ServerState(), {})
    transport = ConnectionTransport()
    protocol.connection_made(transport)
    return protocol, transport


def test_probes_and_refusals_are_written_inside_the_read_that_brought_them_with_no_task():
    """Under load a turn of the event loop reads hundreds of requests and runs their apps' tasks afterwards; a
    probe's or a refusal's answer written at once, in the parser's callback, does not wait for them."""
    from serving.errors import Overloaded
    from serving.uvicorn_hooks import install_load_shedding, install_probe_answers

    app_calls = []

    async def app(scope, receive, send):  # the server's app: everything that is not answered at once
        app_calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def refuse(target: bytes) -> None:
        raise Overloaded("queue full", retry_after_s=2.0)

    assert install_single_write_responses()  # answers at once need it, as the service installs it
    assert install_probe_answers(lambda path: (503, {"ready": False}) if path == "/readyz" else None)
    assert install_load_shedding(refuse)

    async def scenario() -> None:
        protocol, transport = await connected(app)
        protocol.data_received(b"GET /readyz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        probe = b"".join(transport.writes)  # nothing has run on the loop since the read
        assert probe.startswith(b"HTTP/1.1 503") and probe.endswith(b'{"ready": false}'), probe
        protocol.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\n\r\nbody")
        refusal = b"".join(transport.writes)[len(probe):]
        assert refusal.startswith(b"HTTP/1.1 503") and b"retry-after: 2" in refusal, refusal
        assert refusal.endswith(b'{"error": "queue full"}') and not transport.closed  # the connection goes on
        assert not protocol.tasks and app_calls == []
        protocol.data_received(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")  # not a probe: the app, in its task
        assert b"".join(transport.writes) == probe + refusal and protocol.tasks
        await asyncio.sleep(0.01)
        assert app_calls == ["/v2"] and b"".join(transport.writes).endswith(b"ok")

    try:
        asyncio.run(scenario())
    finally:  # the patched class is this process's: other tests' requests are not refused
        install_load_shedding(lambda target: None)


def test_answers_at_once_keep_their_order_and_their_connection_rules():
    """A probe pipelined behind an answer in progress goes out after it, not from inside its last write; a request
    read with an answer at once is not cut by the keep-alive timer that answer armed; nothing is started after an
    answer at once closed its connection (handed back to spread connections over workers, or while draining)."""
    from serving.uvicorn_hooks import install_connection_balance, install_probe_answers

    handing_back = False
    assert install_connection_balance(lambda client: None, lambda client: None, lambda client: handing_back)

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"done"})

    assert install_single_write_responses()
    assert install_probe_answers(lambda path: (200, {"ready": True}) if path == "/readyz" else None)
    probe = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"

    async def scenario() -> None:
        protocol, transport = await connected(app)
        protocol.data_received(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + probe)
        assert transport.writes == []  # the probe waits for the answer before it
        await asyncio.sleep(0.2)
        written = b"".join(transport.writes)
        assert written.index(b"done") < written.index(b'{"ready": true}'), written

        protocol, transport = await connected(app)
        protocol.timeout_keep_alive = 0.02  # shorter than /slow: the probe's answer must not close it meanwhile
        protocol.data_received(probe + b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b'{"ready": true}' in b"".join(transport.writes)
        await asyncio.sleep(0.2)  # (a write after the close would fail the transport's assertion)
        assert b"".join(transport.writes).endswith(b"done")

        nonlocal handing_back
        handing_back = True
        protocol, transport = await connected(app)
        protocol.data_received(probe + b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"connection: close" in b"".join(transport.writes).lower()
        assert transport.closed and not protocol.tasks  # closed after the probe: /slow never started

    try:
        asyncio.run(scenario())
    finally:  # the patched class is this process's: other tests' connections are not handed back
        install_connection_balance(lambda client: None, lambda client: None, lambda client: False)


def test_a_keep_alive_timer_lasts_across_requests_and_closes_only_an_idle_connection():
    """``install_lazy_keep_alive``: no timer is armed and cancelled per request; an idle connection still closes
    ``timeout_keep_alive`` after its last answer, blank lines sent meanwhile or not; neither a request running longer
    than that nor one whose head is still arriving when the answer before it ends is cut; a lost connection leaves
    no timer behind."""
    from serving.uvicorn_hooks import install_lazy_keep_alive

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(0.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    assert install_lazy_keep_alive() and install_single_write_responses()
    request = b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"

    def answers(transport) -> int:  # (a write after the close would fail the transport's assertion)
        return b"".join(transport.writes).count(b"\r\n\r\nok")

    async def scenario() -> None:  # the timings leave 100 ms or more either side of what is checked
        loop = asyncio.get_running_loop()
        armed = []
        call_later = loop.call_later
        loop.call_later = lambda delay, *args: armed.append(delay) or call_later(delay, *args)
        try:
            protocol, transport = await connected(app)
            protocol.timeout_keep_alive = 0.5
            armed.clear()
            for _ in range(20):  # 20 requests on one connection, over about 0.4 s: one timer of 0.5 s in all (a
                protocol.data_received(request)  # re-arm for the rest is shorter; and no header timer: the
                await asyncio.sleep(0.02)  # headers come in one read)
            assert answers(transport) == 20 and armed.count(0.5) == 1 and max(armed) == 0.5, armed
            await asyncio.sleep(0.25)  # past the timer's first firing, idle for less than the timeout since
            assert not transport.closed  # the last answer
            await asyncio.sleep(0.5)
            assert transport.closed  # and closed once idle for all of it
        finally:
            loop.call_later = call_later

        protocol, transport = await connected(app)
        protocol.timeout_keep_alive = 0.2
        protocol.data_received(request)
        await asyncio.sleep(0.01)
        protocol.data_received(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # runs past the timer's time
        await asyncio.sleep(0.55)
        assert answers(transport) == 2 and not transport.closed
        await asyncio.sleep(0.4)
        assert transport.closed

        protocol, transport = await connected(app)
        protocol.timeout_keep_alive = 0.2
        protocol.data_received(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.01)
        protocol.data_received(b"GET /slow HTTP/1.1\r\n")  # pipelined; the rest of its head after /slow ends
        await asyncio.sleep(0.54)
        protocol.data_received(b"Host: x\r\n\r\n")
        await asyncio.sleep(0.6)  # the second /slow runs past the timeout counted from the first one's end
        assert answers(transport) == 2

        protocol, transport = await connected(app)  # answered before its body ended (as a refusal is): the rest
        protocol.timeout_keep_alive = 0.3  # of the body, still coming, keeps the connection open
        protocol.data_received(b"POST /fast HTTP/1.1\r\nHost: x\r\ncontent-length: 6\r\n\r\na")
        for piece in b"bcde":
            await asyncio.sleep(0.15)
            protocol.data_received(bytes([piece]))
        assert answers(transport) == 1 and not transport.closed  # 0.6 s after its answer
        protocol.data_received(b"f")
        await asyncio.sleep(0.45)
        assert transport.closed

        protocol, transport = await connected(app)  # blank lines begin no request: they do not keep it open
        protocol.timeout_keep_alive = 0.3
        protocol.data_received(request)
        for _ in range(10):
            await asyncio.sleep(0.1)
            if transport.closed:
                break
            protocol.data_received(b"\r\n")
        assert transport.closed and answers(transport) == 1

        protocol, transport = await connected(app)
        protocol.data_received(request)
        await asyncio.sleep(0.01)
        timer = protocol.timeout_keep_alive_task
        assert timer is not None
        transport.closed = True
        protocol.connection_lost(ConnectionResetError())
        assert timer.cancelled() and protocol.timeout_keep_alive_task is None

    asyncio.run(scenario())


REFUSALS_AT_ONCE = r'''
import asyncio

from uvicorn.protocols.http import httptools_impl

from serving.uvicorn_hooks import (install_connection_balance, install_lazy_keep_alive, install_load_shedding,
                          install_probe_answers, install_read_limits, install_refusals_at_once,
                          install_single_write_responses)
from serving.errors import Overloaded
from tests.test_uvicorn_hooks import connected

cycles = []  # the paths uvicorn made a request-response cycle for


class CountedCycle(httptools_impl.RequestResponseCycle):
    def __init__(self, *args, **kwargs):
        cycles.append(kwargs["scope"]["path"])
        super().__init__(*args, **kwargs)


httptools_impl.RequestResponseCycle = CountedCycle


def refuse(target):
    if target != b"/ok":
        raise Overloaded("queue full", retry_after_s=2.0)


async def app(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


assert install_refusals_at_once()  # in serving.service's order: first
assert install_read_limits(0.5, 0) and install_single_write_responses() and install_lazy_keep_alive()
assert install_connection_balance(lambda client: None, lambda client: None, lambda client: False)
assert install_probe_answers(lambda path: None) and install_load_shedding(refuse)


async def scenario():
    protocol, transport = await connected(app)
    head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\ncontent-length: 6\r\n\r\n"
    protocol.data_received(head + b"abc")  # refused on its headers, half its body still to come
    refusal = b"".join(transport.writes)
    assert refusal.startswith(b"HTTP/1.1 503") and b"\r\nretry-after: 2\r\n" in refusal, refusal
    assert refusal.endswith(b'\r\n\r\n{"error": "queue full"}') and b"content-length: 23" in refusal, refusal
    assert cycles == [] and not protocol.tasks and not transport.closed  # no cycle, no task: written at once
    protocol.data_received(b"def" + b"POST /ok HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\nhi")
    await asyncio.sleep(0.05)  # the rest of the refused body is dropped; the next request is served
    assert b"".join(transport.writes)[len(refusal):].endswith(b"\r\n\r\nok") and cycles == ["/ok"]
    assert not transport.closed

    for reads in ([head + b"abcdef"], [head + b"abc", b"def"]):  # idle after a refusal, its body in the same read
        protocol, transport = await connected(app)  # or a later one: closed at the keep-alive timeout
        protocol.timeout_keep_alive = 0.3
        for data in reads:
            protocol.data_received(data)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert transport.closed and b"".join(transport.writes).count(b"HTTP/1.1") == 1, reads

    protocol, transport = await connected(app)  # an upgrade the header rename missed: uvicorn's own path, no crash
    protocol.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nConnection: UpGrAdE\r\n"
                           b"UpGrAdE: h2c\r\ncontent-length: 0\r\n\r\n")
    assert cycles[-1] == "/v2/models/m/infer" and b"".join(transport.writes).startswith(b"HTTP/1.1 503")

    protocol, transport = await connected(app)  # a refused body that stops: closed at the read timeout, no 408
    protocol.data_received(head + b"abc")
    await asyncio.sleep(0.8)
    assert transport.closed and b"".join(transport.writes).count(b"HTTP/1.1") == 1

    protocol, transport = await connected(app)  # HTTP/1.0: through uvicorn's cycle, which ends the connection
    protocol.data_received(head.replace(b"HTTP/1.1", b"HTTP/1.0") + b"abcdef")
    written = b"".join(transport.writes)
    assert written.startswith(b"HTTP/1.1 503") and b"connection: close" in written and transport.closed

asyncio.run(scenario())
print("refusals at once: ok")
'''


def test_a_refusal_on_its_headers_is_written_without_uvicorns_cycle_and_the_connection_goes_on():
    """``install_refusals_at_once``: a refused request costs no request-response cycle and no task; what is left of
    its body is dropped, the next request on the connection is served, a refused body that stops is cut at the read
    timeout as any, and HTTP/1.0 falls back to uvicorn's cycle. Run in a fresh interpreter: the wrappers must go on
    in the service's order, which other tests here do not keep."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", REFUSALS_AT_ONCE], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "refusals at once: ok" in done.stdout, done.stderr[-3000:]


def test_a_request_read_after_its_connection_closed_holds_no_concurrency_slot():
    """A request that came in the same read as an answer that closed the connection (handed back to spread
    connections over the workers, or while draining) is never started, and must not keep the slot of
    ``CNNSERVE_MAX_CONCURRENCY`` it would have taken: each such request lowered the worker's limit for good."""
    from serving.uvicorn_hooks import InFlight, install_connection_balance, install_load_shedding, install_probe_answers

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    assert install_single_write_responses()
    assert install_probe_answers(lambda path: (200, {"ready": True}) if path == "/readyz" else None)
    assert install_load_shedding(lambda target: None, max_in_flight=8)
    assert install_connection_balance(lambda client: None, lambda client: None, lambda client: True)

    async def scenario() -> None:
        before = InFlight.count
        protocol, transport = await connected(app)
        protocol.data_received(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n")
        await asyncio.sleep(0.05)
        assert transport.closed and b'{"ready": true}' in b"".join(transport.writes) and not protocol.tasks
        assert InFlight.count == before
        protocol, transport = await connected(app)  # a WebSocket handshake: uvicorn hands it to another protocol
        with contextlib.suppress(Exception):  # (which the recording transport cannot take)
            protocol.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nConnection: UpGrAdE\r\n"
                                   b"UpGrAdE: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                   b"Sec-WebSocket-Version: 13\r\ncontent-length: 0\r\n\r\n")
        await asyncio.sleep(0.05)
        assert InFlight.count == before and not protocol.tasks

    try:
        asyncio.run(scenario())
    finally:  # the patched class is this process's: other tests' connections are not handed back
        InFlight.limit = 0
        install_connection_balance(lambda client: None, lambda client: None, lambda client: False)


def test_a_request_offering_an_upgrade_is_served_as_http_1_1_with_its_body():
    """curl --http2 and Java's HttpClient offer ``Upgrade: h2c`` on http:// URLs; the parser stopped at such a
    request's headers and the app got no body. Ignored, as RFC 9110 lets a server: the request is served."""
    from serving.asgi import receive_body
    from serving.uvicorn_hooks import install_upgrades_ignored

    bodies = []

    async def app(scope, receive, send):
        body = await receive_body(receive, None, 1 << 20)
        bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    assert install_upgrades_ignored()

    async def scenario() -> None:
        protocol, transport = await connected(app)
        protocol.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: Upgrade, HTTP2-Settings\r\nUPGRADE: h2c\r\n"
                               b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\ncontent-length: 5\r\n\r\nhello")
        await asyncio.sleep(0.05)
        assert bodies == [b"hello"] and b"".join(transport.writes).startswith(b"HTTP/1.1 200")
        assert not transport.closed  # and the connection goes on
        body = b"a\r\nUpgrade: h2c\r\n\r\nz"  # a body's bytes are never rewritten, in the head's read or later
        protocol.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n%s" % (2 * len(body), body))
        protocol.data_received(body)
        await asyncio.sleep(0.05)
        assert bodies[1:] == [body + body]

    asyncio.run(scenario())


