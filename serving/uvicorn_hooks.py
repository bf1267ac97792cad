"""Hooks into uvicorn's httptools protocol, the one place that reaches into uvicorn's private classes (the
``install_*`` functions): limits on reading a request, keep-alive, one write per response, load shedding on
a request's headers, probes and refusals answered at once, connections handed back and accepted in batches.
Each wraps methods of ``HttpToolsProtocol`` (or its ``RequestResponseCycle``) and returns False where that
class is missing; ``serving.service`` installs them in every worker."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from serving.accepting import Acceptor
from serving.errors import (
    Overloaded,
    TooManyRequests,
    http_error,
    log_refusal,
)
from serving.listeners import find_listeners
from serving.metrics import observe_shed

log = logging.getLogger("cnnserve.uvicorn_hooks")


def _closing_answer(status: bytes, message: str) -> bytes:
    """A whole HTTP response that ends its connection: a JSON error written straight to the transport."""
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body))


REQUEST_TIMEOUT_408 = _closing_answer(b"408 Request Timeout", "the request headers did not arrive in time")
BODY_STALLED_408 = _closing_answer(b"408 Request Timeout", "the request body stopped arriving")


class _HeldHead:
    """A connection's transport, standing in while a response's status line and headers are held back: they go
    out with the first body write, in one ``write`` (one send on the socket) instead of two."""

    def __init__(self, transport: Any) -> None:
        self.transport, self.held = transport, b""

    def write(self, data: bytes) -> None:
        self.held += data

    def close(self) -> None:
        self.release().close()

    def release(self) -> Any:
        """Write what is held; returns the real transport."""
        if self.held:
            held, self.held = self.held, b""
            self.transport.write(held)
        return self.transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


# an Upgrade header's name, at a line start; found only where the cheap look for its letters found something
UPGRADE_HEADER = re.compile(rb"(\r\n)(upgrade[ \t]*:)", re.IGNORECASE)


def install_upgrades_ignored() -> bool:
    """Read a request that offers to switch protocols (``Upgrade: h2c``, which curl ``--http2`` and Java's
    HttpClient send on http:// URLs; a WebSocket handshake) as the plain HTTP/1.1 request it also is, as a server
    may (RFC 9110, 7.8): the service has no other protocol to switch to. uvicorn's httptools parser stopped at such
    a request's headers and never passed its body on (an outside probe: ``curl --http2`` infer requests got 400
    "malformed JSON", ``/classify`` "images Field required"). The header is renamed (``x-ignored-upgrade``) in the
    bytes of the read before the parser sees them, in the request's head only: up to the first blank line, and not
    in a read that continues a body the app is to get; a read without the letters of "rade" in either case costs two
    byte searches. A header split across two reads, or in a read that began inside the body before it, is not found
    and is answered as before. Wraps ``data_received`` of uvicorn's httptools protocol; False where that class is
    missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    if getattr(HttpToolsProtocol, "_cnnserve_upgrades_ignored", False):
        return True
    received = HttpToolsProtocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        cycle = self.cycle  # reading a body the app is to get: its bytes are left as they are
        if (b"rade" in data or b"RADE" in data) and (cycle is None or cycle.response_complete or not cycle.more_body):
            end = data.find(b"\r\n\r\n")
            if end < 0:
                end = len(data)
            data = UPGRADE_HEADER.sub(rb"\1x-ignored-\2", data[:end]) + data[end:]
        received(self, data)

    HttpToolsProtocol.data_received = data_received
    HttpToolsProtocol._cnnserve_upgrades_ignored = True
    return True


def install_lazy_keep_alive() -> bool:
    """Keep one keep-alive timer per connection across its requests, where uvicorn arms one when a response is
    complete and cancels it at the next read: a ``call_later`` and a cancel per request ("Timers per request" in
    serving/README.md). A response's end notes when the connection fell idle and arms the timer if none is armed;
    a request's first byte marks the connection busy, and a read of the rest of a request answered before its body
    ended (a refusal on its headers) restarts the idle clock; the timer, when it fires, closes a connection idle for
    the whole timeout, re-arms itself for the rest if idle for less, and leaves a busy one to its next response's
    end. A connection closes ``timeout_keep_alive`` after its last answer (or the last read of such a body), never
    while a request is in progress or its head is arriving; stray bytes that begin no request (blank lines) do not
    keep it open (an outside probe held one open with a blank line every 2 s; uvicorn armed no timer at all after
    one). Replaces
    uvicorn's httptools ``on_response_complete`` (its steps kept but the cancel: the request count, reads resumed,
    a pipelined request started), ``timeout_keep_alive_handler`` and ``_unset_keepalive_if_required``; False where
    that class is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    if getattr(HttpToolsProtocol, "_cnnserve_lazy_keep_alive", False):
        return True
    begin, complete, message_complete, lost = (
        HttpToolsProtocol.on_message_begin, HttpToolsProtocol.on_headers_complete,
        HttpToolsProtocol.on_message_complete, HttpToolsProtocol.connection_lost)

    def arm(protocol: Any, delay: float) -> None:
        protocol.timeout_keep_alive_task = protocol.loop.call_later(delay, protocol.timeout_keep_alive_handler)

    def on_response_complete(self: Any) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # the next request, read while this one ran, starts now: busy still
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self._head_arriving:  # the next request's head is partly read: busy (the header timer watches it)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            arm(self, self.timeout_keep_alive)

    def timeout_keep_alive_handler(self: Any) -> None:
        self.timeout_keep_alive_task = None
        if self.transport.is_closing() or self._idle_since is None:  # busy: its answer's end arms the timer again
            return
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            arm(self, left)
        else:
            self.transport.close()

    def unset_keep_alive(self: Any) -> None:  # uvicorn calls this on every read
        if self._idle_since is not None and self._receiving:  # a refused request's body still coming
            self._idle_since = self.loop.time()

    def on_message_begin(self: Any) -> None:
        begin(self)
        self._idle_since, self._head_arriving, self._receiving = None, True, True

    def on_message_complete(self: Any) -> None:
        self._receiving = False
        message_complete(self)

    def on_headers_complete(self: Any) -> None:
        self._head_arriving = False
        complete(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        lost(self, exc)

    # a new connection: neither idle nor arriving (the read limits' timer, when installed, watches it)
    HttpToolsProtocol._idle_since, HttpToolsProtocol._head_arriving, HttpToolsProtocol._receiving = None, False, False
    HttpToolsProtocol.on_response_complete = on_response_complete
    HttpToolsProtocol.timeout_keep_alive_handler = timeout_keep_alive_handler
    HttpToolsProtocol._unset_keepalive_if_required = unset_keep_alive
    HttpToolsProtocol.on_message_begin, HttpToolsProtocol.on_headers_complete = on_message_begin, on_headers_complete
    HttpToolsProtocol.on_message_complete, HttpToolsProtocol.connection_lost = on_message_complete, connection_lost
    HttpToolsProtocol._cnnserve_lazy_keep_alive = True
    return True


def install_single_write_responses() -> bool:
    """Send a response's head and its (first) body in one socket write. uvicorn writes the status line and the
    headers when the app sends ``http.response.start``, then the body on ``http.response.body``: two sends, each
    of which, over loopback or to a busy peer, costs the sending worker the delivery too (a fifth of the event
    loop's time in a py-spy profile under open-loop overload, serving/README.md). Wraps uvicorn's httptools
    ``RequestResponseCycle.send``: the head is held on ``response.start`` and written with the next message's
    bytes. Returns False where that class is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
    except ImportError:
        return False
    if getattr(RequestResponseCycle, "_cnnserve_single_write", False):
        return True
    send = RequestResponseCycle.send

    async def single_write_send(self: Any, message: dict) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            self.transport = _HeldHead(self.transport)
            try:
                await send(self, message)
            except BaseException:
                self.transport = self.transport.release()
                raise
            return
        head = self.transport if isinstance(self.transport, _HeldHead) else None
        try:
            await send(self, message)
        finally:
            if head is not None:
                self.transport = head.release()

    RequestResponseCycle.send = single_write_send
    RequestResponseCycle._cnnserve_single_write = True
    return True


def install_read_limits(timeout_s: float, max_header_bytes: int) -> bool:
    """Limits on reading a request, which uvicorn does not set (its httptools protocol arms no timer until a
    request is complete, and buffers headers of any size):

    * headers not complete ``timeout_s`` after the read that brought the request's first byte: 408 and close (a
      client trickling header bytes, slowloris, held a connection for as long as it kept sending); armed only when
      that read leaves the headers incomplete, so a request whose headers come in one read pays for no timer
      ("Timers per request" in serving/README.md); a new connection that has sent nothing yet is closed silently
      after uvicorn's keep-alive timeout (``timeout_s`` where that is 0), as an idle keep-alive connection is (a 408
      there reached pools and load balancers that open connections ahead of use as the answer to their next
      request);
    * a body with no new bytes for ``timeout_s``: 408 and close, unless its answer has begun (a stalled upload
      held its in-flight slot, one of ``CNNSERVE_MAX_CONCURRENCY``, until the request timeout; a slow one that
      keeps sending goes on); armed only when a read leaves the body incomplete, so most requests pay nothing;
    * request line and headers over ``max_header_bytes`` (0: no limit) and still incomplete: 431 and close (a
      64 MB header was buffered whole and answered); counted per read, so the cut comes within one read of it.

    It wraps methods of uvicorn's httptools protocol class (the one BentoML's uvicorn uses when httptools is
    installed, as the ``serve`` extra does); ``tests/test_bad_input.py`` checks it on the real server. Returns
    False where that class is missing (nothing installed)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    if getattr(HttpToolsProtocol, "_cnnserve_read_limits", False):
        return False
    too_large = _closing_answer(b"431 Request Header Fields Too Large",
                                f"the request line and headers are over {max_header_bytes} bytes "
                                "(CNNSERVE_MAX_HEADER_BYTES)")
    made, begin, complete, finished, lost, received = (
        HttpToolsProtocol.connection_made, HttpToolsProtocol.on_message_begin, HttpToolsProtocol.on_headers_complete,
        HttpToolsProtocol.on_message_complete, HttpToolsProtocol.connection_lost, HttpToolsProtocol.data_received)

    def arm(protocol: Any, answer: bytes, delay: float = timeout_s) -> None:
        disarm(protocol)
        if delay > 0:
            protocol._read_timer = protocol.loop.call_later(delay, expire, protocol, answer)

    def disarm(protocol: Any) -> None:
        timer = getattr(protocol, "_read_timer", None)
        if timer is not None:
            timer.cancel()
            protocol._read_timer = None

    def expire(protocol: Any, answer: bytes) -> None:
        protocol._read_timer = None
        cycle = protocol.cycle  # in "head": the connection's previous request's, if any
        if protocol.transport.is_closing():
            return
        if protocol._reading == "new":  # not a byte since it opened: closed as an idle keep-alive connection is
            protocol.transport.close()
            return
        answering = cycle is not None and not cycle.response_complete  # a pipelined request's answer to come
        if protocol._reading == "body":
            if protocol.flow.read_paused or cycle.waiting_for_100_continue:
                arm(protocol, answer)  # the app has not taken what came, or not asked for it: the server waits
                return
            if cycle.response_complete:  # answered before its body came (a refusal on its headers)
                protocol.transport.close()
                return
            answering = cycle.response_started
        if answering:  # its bytes must not go into another answer: the connection ends after that one
            cycle.keep_alive = False
            return
        protocol.transport.write(answer)
        protocol.transport.close()

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        self._reading, self._head_bytes, self._completed, self._read_timer = "new", 0, 0, None
        arm(self, b"", getattr(self, "timeout_keep_alive", 0) or timeout_s)

    def on_message_begin(self: Any) -> None:  # a request's first byte: its header timer is armed after the read
        begin(self)
        self._reading, self._head_bytes = "head", 0
        disarm(self)

    def on_headers_complete(self: Any) -> None:
        self._reading = "body"
        disarm(self)
        complete(self)

    def on_message_complete(self: Any) -> None:
        self._reading = "idle"
        self._completed += 1
        disarm(self)
        finished(self)

    def data_received(self: Any, data: bytes) -> None:
        began, completed = self._reading, self._completed
        if began == "head":
            self._head_bytes += len(data)
        received(self, data)
        if self._reading == "head":
            if self._read_timer is None:  # the headers began in this read and are not complete
                arm(self, REQUEST_TIMEOUT_408)
            if began in ("new", "idle") and self._completed == completed:  # the request began this read, and
                self._head_bytes += len(data)  # nothing of an earlier one's came with it
            if max_header_bytes and self._head_bytes > max_header_bytes and not self.transport.is_closing():
                disarm(self)
                if self.cycle is not None and not self.cycle.response_complete:  # a pipelined request's answer
                    self.cycle.keep_alive = False  # is going out: end the connection after it, read no more
                    self.flow.pause_reading()
                else:
                    self.transport.write(too_large)
                    self.transport.close()
        elif self._reading == "body":
            arm(self, BODY_STALLED_408)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        disarm(self)
        lost(self, exc)

    HttpToolsProtocol.connection_made, HttpToolsProtocol.on_message_begin = connection_made, on_message_begin
    HttpToolsProtocol.on_headers_complete = on_headers_complete
    HttpToolsProtocol.on_message_complete = on_message_complete
    HttpToolsProtocol.data_received, HttpToolsProtocol.connection_lost = data_received, connection_lost
    HttpToolsProtocol._cnnserve_read_limits = True
    return True


def install_connection_balance(opened: Callable[[object], None], closed: Callable[[object], None],
                               hand_back: Callable[[object], bool]) -> bool:
    """Call ``opened(client)`` and ``closed(client)`` as uvicorn's httptools protocol opens and loses each HTTP
    connection (``client``: the peer address, as the ASGI scope gives it), and ask ``hand_back(client)`` when a
    request's headers are in: True ends the connection after this response, with ``Connection: close`` (uvicorn's
    own way of ending keep-alive connections at shutdown), so the client reconnects, usually to another worker
    (``serving.connections``). Wraps three methods of that class, as ``install_read_limits`` does;
    ``tests/test_server.py`` checks the effect on the real server. Installing again replaces the callbacks.
    Returns False where that class is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    HttpToolsProtocol._cnnserve_opened, HttpToolsProtocol._cnnserve_closed, HttpToolsProtocol._cnnserve_hand_back = (
        staticmethod(opened), staticmethod(closed), staticmethod(hand_back))
    if getattr(HttpToolsProtocol, "_cnnserve_connection_balance", False):
        return True
    made, complete, lost = (HttpToolsProtocol.connection_made, HttpToolsProtocol.on_headers_complete,
                            HttpToolsProtocol.connection_lost)

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        self._cnnserve_opened(self.client)

    def on_headers_complete(self: Any) -> None:
        complete(self)
        cycle = self.cycle  # an answer written at once asked already (_install_answers_at_once)
        if cycle is not None and cycle.keep_alive and not cycle.response_complete and \
                self._cnnserve_hand_back(self.client):
            self.cycle.keep_alive = False

    def connection_lost(self: Any, exc: Exception | None) -> None:
        self._cnnserve_closed(self.client)
        lost(self, exc)

    HttpToolsProtocol.connection_made, HttpToolsProtocol.on_headers_complete = connection_made, on_headers_complete
    HttpToolsProtocol.connection_lost = connection_lost
    HttpToolsProtocol._cnnserve_connection_balance = True
    return True


def install_batch_accept() -> bool:
    """Under uvloop, accept every connection waiting on the HTTP listener at each turn of the loop
    (``serving.accepting``), not one: started by the first connection uvicorn's httptools protocol makes in this
    process, with that protocol's own factory arguments and the listener that connection came from. Returns False
    where that class is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    if getattr(HttpToolsProtocol, "_cnnserve_batch_accept", False):
        return True
    made = HttpToolsProtocol.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        if HttpToolsProtocol._cnnserve_acceptor is None:
            HttpToolsProtocol._cnnserve_acceptor = _start_acceptor(self, transport)

    HttpToolsProtocol.connection_made = connection_made
    HttpToolsProtocol._cnnserve_acceptor = None
    HttpToolsProtocol._cnnserve_batch_accept = True
    return True


def _start_acceptor(protocol: Any, transport: Any) -> Acceptor | bool:
    """An ``Acceptor`` on the listener ``transport``'s connection came in on, making protocols like ``protocol``;
    False (tried: not again) under another loop than uvloop (asyncio's accepts a batch itself) or where the
    listener is not found."""
    loop = asyncio.get_running_loop()
    port = (transport.get_extra_info("sockname") or (None, None))[1]
    if not type(loop).__module__.startswith("uvloop") or port is None:
        return False
    listeners = find_listeners(keep_ports=set())
    mine = [sock for sock in listeners if sock.getsockname()[1] == port]
    for sock in listeners:
        if sock not in mine[:1]:
            sock.close()
    if not mine:
        return False
    kind, config, state, app_state = type(protocol), protocol.config, protocol.server_state, protocol.app_state
    acceptor = Acceptor(mine[0], lambda: kind(config=config, server_state=state, app_state=app_state))
    acceptor.start()
    return acceptor


# scope key of a request admitted when its headers came in (``install_load_shedding``): its model's budget is not
# applied again once the body is parsed, the parse being paid for (``DynamicBatcher.infer``'s ``admitted``)
ADMITTED = "cnnserve.admitted"
# the inference routes, as the request line gives them: the requests that load shedding may refuse
SHEDDABLE = re.compile(rb"/(?:v2/models/[^?]*/infer|classify|predict)(?:\?.*)?")


def _sheddable(target: bytes) -> bool:
    """Whether a POST to ``target`` (path and query, as sent) is an inference request, its path percent-decoded as
    the router decodes it (``/v2/models/m/%69nfer`` skipped the header-time checks and was answered)."""
    if SHEDDABLE.fullmatch(target):
        return True
    path = target.partition(b"?")[0]
    return b"%" in path and SHEDDABLE.fullmatch(unquote_to_bytes(path)) is not None


class InFlight:
    """This worker's admitted inference requests in progress (``install_load_shedding``), against ``limit``."""

    count = 0
    limit = 0  # 0: no limit

    @classmethod
    def check(cls) -> None:
        if cls.limit and cls.count >= cls.limit:
            observe_shed("http", "concurrency")
            raise TooManyRequests(f"Too many requests: this worker has {cls.count} inference requests in progress, "
                                  f"its limit (CNNSERVE_MAX_CONCURRENCY); retry later", 1.0)


def _counted(app: Callable[..., Any]) -> Callable[..., Any]:
    """``app``, ending the in-flight count that ``install_load_shedding`` began for its request."""

    async def counted(scope: dict, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            InFlight.count -= 1

    return counted


def install_load_shedding(check: Callable[[bytes], None], max_in_flight: int = 0,
                          lane: Callable[[bytes], Any] | None = None) -> bool:
    """Refuse an inference request (POST to a ``SHEDDABLE`` path) as soon as its headers are parsed when this
    worker already has ``max_in_flight`` admitted inference requests in progress (429; 0 = no limit), or when
    ``check(target)`` (``target``: the request line's path and query) raises ``Overloaded`` (its 503): with
    ``Retry-After`` and a JSON message, the request never reaches BentoML's app, its middlewares or the body
    (uvicorn discards what is left of it and keeps the connection). This is what makes a refusal much cheaper than
    an answer (``serving.loop_lag``, ``serving.oip_rest.check_admission``); other requests (health, metadata,
    metrics) are never refused here. Counting on the headers, not inside the app, keeps the limit where BentoML's
    ``max_concurrency`` would refuse the same request only after its whole middleware stack. ``lane(target)``, when
    given, may return the ASGI app to run an admitted request instead of the server's (None: the server's).

    Like uvicorn's own ``limit_concurrency``, it swaps the ASGI app of the one request, inside uvicorn's httptools
    protocol (``install_read_limits`` wraps the same class); ``tests/test_overload.py`` checks it on the real
    server. Installing again replaces ``check`` and the limit. Returns False where that class is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    HttpToolsProtocol._cnnserve_shed_check = staticmethod(check)
    HttpToolsProtocol._cnnserve_lane = staticmethod(lane or (lambda target: None))
    InFlight.limit = max_in_flight
    if getattr(HttpToolsProtocol, "_cnnserve_load_shedding", False):
        return True
    complete = HttpToolsProtocol.on_headers_complete

    def on_headers_complete(self: Any) -> None:
        if self.parser.get_method() != b"POST" or not _sheddable(self.url):
            complete(self)
            return
        try:
            InFlight.check()
            self._cnnserve_shed_check(self.url)
        except Overloaded as exc:
            log_refusal(exc, "http")
            self._cnnserve_refusal = exc  # written by install_refusals_at_once's hook where it applies
            try:
                _complete_answering(self, complete, _refusal_app(exc))
            finally:
                self._cnnserve_refusal = None
            return
        self.scope[ADMITTED] = True
        # counted from now to the end of its app; a pipelined request (queued behind the connection's current one)
        # is not, nor is one uvicorn's own limit_concurrency answers, nor one read after an answer in the same read
        # closed the connection, nor an upgrade uvicorn hands to its WebSocket protocol: their app may never run
        started = self.cycle is None or self.cycle.response_complete
        if not started or self.limit_concurrency is not None or self.transport.is_closing() or \
                self.parser.should_upgrade():  # closing, or switching protocols: its app never runs here
            complete(self)
            return
        InFlight.count += 1
        app, self.app = self.app, _counted(self._cnnserve_lane(self.url) or self.app)
        try:
            complete(self)
        finally:
            self.app = app

    HttpToolsProtocol.on_headers_complete = on_headers_complete
    _install_answers_at_once(HttpToolsProtocol)
    HttpToolsProtocol._cnnserve_load_shedding = True
    return True


def install_probe_answers(answer: Callable[[str], tuple[int, dict] | None]) -> bool:
    """Answer ``GET`` and ``HEAD`` probes (``/readyz``, ``/livez`` and the like) on the HTTP port as soon as their
    headers are parsed: ``answer(path)`` gives (status, JSON body), or None for a path that is not a probe (served
    as before). The answer is written at once, in the turn of the loop that read the request (``answer_at_once``),
    never queued behind that turn's inference: under overload a probe through BentoML's app waited for the turn's
    tasks and for a thread (BentoML runs a synchronous ``__is_ready__`` in one), tens of milliseconds. Returns False
    where uvicorn's httptools protocol is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    HttpToolsProtocol._cnnserve_probe_answer = staticmethod(answer)
    if getattr(HttpToolsProtocol, "_cnnserve_probe_answers", False):
        return True
    complete = HttpToolsProtocol.on_headers_complete

    def on_headers_complete(self: Any) -> None:
        found = None
        if self.parser.get_method() in (b"GET", b"HEAD"):
            try:
                found = self._cnnserve_probe_answer(self.url.partition(b"?")[0].decode("latin-1"))
            except Exception:  # a defect: logged, and the probe goes to the app as before
                log.exception("the probe answer failed")
        if found is None:
            complete(self)
            return
        _complete_answering(self, complete, answer_at_once(*found))

    HttpToolsProtocol.on_headers_complete = on_headers_complete
    _install_answers_at_once(HttpToolsProtocol)
    HttpToolsProtocol._cnnserve_probe_answers = True
    return True


class _Refused:
    """Stands in for uvicorn's request-response cycle of a request that ``install_refusals_at_once`` refused: its answer
    is complete, so uvicorn's parser callbacks discard what comes of its body, and the next request on the
    connection starts as after any finished answer."""

    response_complete = response_started = True
    keep_alive = disconnected = waiting_for_100_continue = False

    class message_event:  # what uvicorn's connection_lost sets
        @staticmethod
        def set() -> None:
            pass


@functools.lru_cache(maxsize=64)
def _refusal_tail(status: int, message: str, retry_after: str | None) -> bytes:
    """A refusal's headers after the server's default ones, and its JSON body (``http_error``'s)."""
    body = json.dumps({"error": message}).encode()
    retry = b"retry-after: %s\r\n" % retry_after.encode() if retry_after is not None else b""
    return b"content-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), retry, body)


def _refusal_app(exc: Overloaded) -> Callable[..., Any]:
    """``answer_at_once`` of ``exc``'s ``http_error``, made only when uvicorn's cycle runs it: where
    ``install_refusals_at_once`` writes the refusal, the app is never called."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await answer_at_once(*http_error(exc))(scope, receive, send)

    app.answers_at_once = True
    return app


def install_refusals_at_once() -> bool:
    """Let ``install_load_shedding``'s refusals skip uvicorn's request-response cycle: where a refusal applies,
    write it straight to the connection as one pre-built response and leave the connection as uvicorn leaves it
    after any answer (keep-alive timer armed, reads resumed). Replaces uvicorn's own ``on_headers_complete`` for
    the refused request only, so it must be installed before every other wrapper of that method (the others, read
    limits and connection balance, then do their part for a refusal as for any request). Under open-loop overload
    the cycle, its ASGI messages and header checks were about half of a refusal's cost on the worker
    (serving/README.md). Where it does not apply the refusal goes through uvicorn's cycle as before
    (``_complete_answering``): an answer in progress on the connection (the request is pipelined behind it), writes
    paused, not keep-alive HTTP/1.1, ``Expect: 100-continue``, an upgrade request, a refusal that ends its
    connection, or a connection the worker hands back (``install_connection_balance``). Returns False where
    uvicorn's httptools protocol is missing, or when other wrappers were installed first."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:
        return False
    if getattr(HttpToolsProtocol, "_cnnserve_refusals_at_once", False):
        return True
    if any(getattr(HttpToolsProtocol, flag, False) for flag in
           ("_cnnserve_read_limits", "_cnnserve_connection_balance", "_cnnserve_probe_answers",
            "_cnnserve_load_shedding", "_cnnserve_lazy_keep_alive")):
        return False
    complete = HttpToolsProtocol.on_headers_complete

    def refuse(protocol: Any, exc: Overloaded) -> bool:
        cycle = protocol.cycle
        if (cycle is not None and not cycle.response_complete) or protocol.flow.write_paused \
                or protocol.expect_100_continue or protocol.transport.is_closing() \
                or protocol.parser.get_http_version() != "1.1" or not protocol.parser.should_keep_alive() \
                or protocol.parser.should_upgrade():
            return False
        status, body, headers = http_error(exc)
        if set(headers) - {"Retry-After"}:
            return False
        hand_back = getattr(protocol, "_cnnserve_hand_back", None)
        if hand_back is not None and hand_back(protocol.client):
            return False
        protocol.transport.write(b"".join([
            STATUS_LINE[status], *(b"%s: %s\r\n" % header for header in protocol.server_state.default_headers),
            _refusal_tail(status, body["error"], headers.get("Retry-After"))]))
        protocol.cycle = _Refused
        protocol.on_response_complete()
        return True

    def on_headers_complete(self: Any) -> None:
        if self._cnnserve_refusal is None or not refuse(self, self._cnnserve_refusal):
            complete(self)

    HttpToolsProtocol.on_headers_complete = on_headers_complete
    HttpToolsProtocol._cnnserve_refusal = None
    HttpToolsProtocol._cnnserve_refusals_at_once = True
    return True


def _complete_answering(protocol: Any, complete: Callable[[Any], None], app: Callable[..., Any]) -> None:
    """``complete(protocol)`` (uvicorn's ``on_headers_complete`` and the wrappers inside it) with ``app`` answering
    this request, at once when uvicorn starts it from here (``_install_answers_at_once``); a pipelined request,
    queued behind the connection's answer in progress, gets ``app`` in a task of its own when its turn comes."""
    app, protocol.app = protocol.app, app
    protocol._cnnserve_answering = True
    try:
        complete(protocol)
    finally:
        protocol.app, protocol._cnnserve_answering = app, False


def _install_answers_at_once(protocol_class: type) -> None:
    """Run the apps ``answer_at_once`` makes inside the parser's callback instead of in a task of their own (uvicorn
    starts each request's app as a task, which runs after every other callback of the turn: under load, after the
    hundreds of requests the same turn read). Only for a request started from its own headers callback
    (``_complete_answering``): a pipelined one is started when the answer before it completes, from inside that
    answer's last write, and its bytes would go out first. Not where the connection's writes are paused, nor without
    ``install_single_write_responses`` (then the head's write could pause them, and the body's would wait): a task
    as before. The connection's hand-back (``install_connection_balance``) is asked before the answer is written.
    A request that comes in after an answer at once closed the connection (HTTP/1.0, ``Connection: close``) is not
    started, as uvicorn starts no pipelined request on a closing connection. Installs ``install_lazy_keep_alive``
    too: with uvicorn's own timer, the keep-alive timer an answer at once armed was left armed by a request read
    after it in the same read (uvicorn cancels it at the next read only), and closed its connection while it ran."""
    if getattr(protocol_class, "_cnnserve_at_once", False):
        return
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    install_lazy_keep_alive()
    start_task = protocol_class._start_asgi_task

    def start_asgi_task(self: Any, cycle: Any, app: Any) -> None:
        if self.transport.is_closing():
            return
        if getattr(app, "answers_at_once", False) and getattr(self, "_cnnserve_answering", False) and \
                not cycle.flow.write_paused and getattr(RequestResponseCycle, "_cnnserve_single_write", False):
            hand_back = getattr(self, "_cnnserve_hand_back", None)
            if cycle.keep_alive and hand_back is not None and hand_back(self.client):
                cycle.keep_alive = False
            _run_at_once(cycle.run_asgi(app))
        else:
            start_task(self, cycle, app)

    protocol_class._start_asgi_task = start_asgi_task
    protocol_class._cnnserve_at_once = True


def _run_at_once(coroutine: Any) -> None:
    """Run ``coroutine``, which must not wait for anything, to its end now, in the caller's turn of the loop."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("an answer meant to be written at once waited for something")


def answer_at_once(status: int, body: dict, headers: dict[str, str] | None = None) -> Callable[..., Any]:
    """An ASGI app that answers ``status`` with ``body`` as JSON and ``headers``, and never waits while the
    connection takes its bytes: the protocol runs it at once (``_install_answers_at_once``), with no task of its own,
    a fraction of a task's cost."""
    content = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content)),
            *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": content})

    app.answers_at_once = True
    return app


