"""The service protects itself and its clients, with the real server: admission control on both doors,
limits enforced before work, versions removed under load, and a shutdown that reports not-ready first."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.server import MAX_BYTES, MAX_IMAGES, free_port, start_server

BIG = np.zeros((64, 28, 28), np.uint8)


def binary_infer(url: str, images: np.ndarray, model: str = "mnist-cnn") -> httpx.Response:
    header = json.dumps({"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                                     "parameters": {"binary_data_size": images.size}}]}).encode()
    return httpx.post(f"{url}/v2/models/{model}/infer", content=header + images.tobytes(), timeout=30,
                      headers={"Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream"})


@pytest.fixture(scope="module")
def small_queue_server(repo, tmp_path_factory):
    """One worker whose queue holds at most 64 images per model: a second full batch waiting is refused."""
    srv = start_server(repo, tmp_path_factory.mktemp("queue") / "server.log", workers=1, max_queue_images=64,
                       queue_budget_ms=0, poll_interval_s=0)
    yield srv
    srv.stop()


def test_requests_past_the_queue_bound_are_refused_fast_on_http_with_retry_after(small_queue_server):
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: binary_infer(small_queue_server.url, BIG), range(96)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "no request was refused"
    assert all(r.status_code in (200, 503) for r in responses)
    assert all(int(r.headers["Retry-After"]) >= 1 and "overloaded" in r.json()["error"] for r in refused)
    assert len(refused) < len(responses)
    assert rejected_count(small_queue_server.url, "oip-rest") >= len(refused), "refusals not counted as rejected"


def unattributed_rejections(url: str) -> float:
    """``cnnserve_requests_total`` of gRPC inference requests rejected before their model was known (model "")."""
    wanted = 'cnnserve_requests_total{door="oip-grpc",model="",outcome="rejected"}'
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def shed_count(url: str, door: str, reason: str) -> float:
    """``cnnserve_shed_requests_total`` of ``door`` and ``reason``."""
    wanted = f'cnnserve_shed_requests_total{{door="{door}",reason="{reason}"}}'
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rejected_count(url: str, door: str) -> float:
    """``cnnserve_requests_total`` of mnist-cnn's requests on ``door`` that the server rejected (overload, deadline),
    which are not counted as the client's fault ("invalid")."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if (line.startswith("cnnserve_requests_total{") and 'model="mnist-cnn"' in line and f'door="{door}"' in line
                and 'outcome="rejected"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_request_past_the_queue_bound_is_refused_on_its_headers_before_its_body_is_sent(small_queue_server):
    """The bound is checked when the headers are in: the 503 comes back although the body was never sent (a
    refusal that read and parsed the request first cost the worker almost what an answer costs)."""
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    head = (f"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + 784}\r\n\r\n")
    answers = []
    with ThreadPoolExecutor(16) as pool:
        flood = [pool.submit(binary_infer, small_queue_server.url, BIG) for _ in range(400)]
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", small_queue_server.http_port), timeout=5) as s:
                s.sendall(head.encode())  # headers only: an admitted request waits for its body
                if select.select([s], [], [], 0.2)[0]:
                    answers.append(s.recv(65536))
            if any(a.startswith(b"HTTP/1.1 503") for a in answers) or all(f.done() for f in flood):
                break
        for f in flood:
            f.cancel()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert refused, f"no request was refused before its body: {answers[:3]}"
    assert b"retry-after" in refused[0].lower() and b"overloaded" in refused[0]


def test_past_the_concurrency_limit_a_request_is_refused_on_its_headers_and_ended_requests_free_their_slots(
        repo, tmp_path):
    """``CNNSERVE_MAX_CONCURRENCY`` counts admitted inference requests from their headers: with the limit's worth
    waiting for their bodies, the next is refused (429, before its body) by this count, not by BentoML's
    middleware after its whole stack (a percent-encoded path too); once the waiting clients go, or their bodies
    stop arriving for the header timeout (408), their requests end and free their slots."""
    srv = start_server(repo, tmp_path / "server.log", workers=1, max_concurrency=2, poll_interval_s=0,
                       header_timeout_s=3)
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    head = (f"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + 784}\r\n\r\n")
    try:
        waiting = [socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) for _ in range(2)]
        for s in waiting:
            s.sendall(head.encode())  # admitted on its headers; its request waits for the body
        time.sleep(0.5)
        for path in ("/v2/models/mnist-cnn/infer", "/v2/models/mnist-cnn/%69nfer"):  # the same route, encoded
            with socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) as s:
                s.sendall(head.replace("/v2/models/mnist-cnn/infer", path).encode())
                answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 429"), (path, answer[:200])
            assert b"retry-after" in answer.lower() and b"2 inference requests in progress" in answer, answer
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as s:  # refused, then its body stalls
            s.sendall(head.encode() + b"{")
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
            assert s.recv(1) == b""  # closed at the timeout (it was kept open with no timer at all)
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'cnnserve_shed_requests_total{door="http",reason="concurrency"} 3.0' in metrics
        waiting[0].close()
        waiting[1].settimeout(10)
        answer = waiting[1].recv(65536)  # its body never came: cut off at the header timeout
        assert answer.startswith(b"HTTP/1.1 408") and b"body stopped arriving" in answer, answer[:300]
        waiting[1].close()
        deadline = time.monotonic() + 10
        while (status := binary_infer(srv.url, BIG[:1]).status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
        assert all(binary_infer(srv.url, BIG[:1]).status_code == 200 for _ in range(5))
    finally:
        srv.stop()


def grpc_flood(address: str, requests: int = 96, clients: int = 16, typed: bool = False) -> list[str]:
    """``requests`` 64-image gRPC calls from ``clients`` threads: "ok" or the error's text for each. ``typed``:
    the pixels as the protocol's typed ``uint_contents`` (decoded into Python ints on the server's event loop,
    which keeps the loop busy), not raw bytes."""
    request = pb.ModelInferRequest(model_name="mnist-cnn", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="images", datatype="UINT8", shape=list(BIG.shape),
        contents=pb.InferTensorContents(uint_contents=BIG.ravel().tolist()) if typed else None)])
    if not typed:
        request.raw_input_contents.append(BIG.tobytes())

    def call(_: int) -> str:
        with grpc.insecure_channel(address) as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
                return "ok"
            except grpc.RpcError as exc:
                pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                return f"{exc.code().name}: {exc.details()}" + (f" [retry in {pushback} ms]" if pushback else "")

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(call, range(requests)))


def test_requests_past_the_queue_bound_are_refused_on_grpc(small_queue_server):
    results = grpc_flood(small_queue_server.grpc_address)
    refused = [r for r in results if r != "ok"]
    assert refused and all("UNAVAILABLE" in r and "overloaded" in r and "retry in" in r for r in refused), refused[:3]
    assert "ok" in results
    assert rejected_count(small_queue_server.url, "oip-grpc") >= len(refused)


def test_past_the_grpc_call_limit_inference_is_refused_and_health_checks_are_not(repo, tmp_path):
    # the limit counts inference calls, whichever intake took them (grpc.aio's or serving.oip_grpc.CallIntake);
    # grpc's own maximum_concurrent_rpcs counted health checks too, and refused them when inference filled it
    srv = start_server(repo, tmp_path / "server.log", workers=1, grpc_max_concurrent_rpcs=2, max_queue_images=0,
                       queue_budget_ms=0, max_queue_wait_ms=0, poll_interval_s=0)
    try:
        with ThreadPoolExecutor(1) as pool, grpc.insecure_channel(srv.grpc_address) as channel:
            flood = pool.submit(grpc_flood, srv.grpc_address)
            health = health_pb2_grpc.HealthStub(channel)
            checks = []
            while not flood.done():
                checks.append(health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
            results = flood.result()
        refused = [r for r in results if r != "ok"]
        assert refused and "ok" in results, results[:3]
        assert all(r.startswith("RESOURCE_EXHAUSTED") and "Too many requests" in r and r.endswith("[retry in 1000 ms]")
                   for r in refused), refused[:3]
        assert checks and set(checks) == {health_pb2.HealthCheckResponse.SERVING}
        # counted once, as shed on arrival (as the HTTP door's 429s), not also as rejected (an outside probe)
        assert shed_count(srv.url, "grpc", "concurrency") == len(refused)
        assert unattributed_rejections(srv.url) == 0
        # an open stream holds a slot for its life, idle or not: two fill this worker
        request = pb.ModelInferRequest(model_name="mnist-cnn", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="images", datatype="UINT8", shape=[1, 28, 28])], raw_input_contents=[bytes(784)])
        with grpc.insecure_channel(srv.grpc_address) as channel:
            stub, idle = pb_grpc.GRPCInferenceServiceStub(channel), threading.Event()
            streams = [stub.ModelStreamInfer(iter(idle.wait, True)) for _ in range(2)]
            time.sleep(1.0)
            with pytest.raises(grpc.RpcError) as refused_call:
                stub.ModelInfer(request, timeout=10)
            assert refused_call.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # nothing else is in flight
            assert "streams in progress" in refused_call.value.details()
            before = shed_count(srv.url, "grpc", "concurrency")
            with pytest.raises(grpc.RpcError) as refused_stream:
                next(stub.ModelStreamInfer(iter([request])))
            assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert shed_count(srv.url, "grpc", "concurrency") == before + 1  # as one refused request
            assert unattributed_rejections(srv.url) == 0
            for stream in streams:
                stream.cancel()
            time.sleep(0.5)
            assert stub.ModelInfer(request, timeout=10).model_name == "mnist-cnn"  # the slots are free again
            idle.set()
    finally:
        srv.stop()


# floods of 96 requests until one is shed: shedding needs two late timers in a row (a standing backlog), which
# one flood on a fast or a busy machine does not always make
ROUNDS = 4


@pytest.fixture(scope="module")
def lagging_server(repo, tmp_path_factory):
    """One worker that sheds inference requests once its event loop has been 1 ms behind for 2 ms, and has no queue
    bounds, budget or wait limit (a slow machine would otherwise refuse some for their queue wait): under concurrent
    load it refuses requests on lag alone."""
    srv = start_server(repo, tmp_path_factory.mktemp("lag") / "server.log", workers=1, max_loop_lag_ms=1,
                       loop_lag_window_ms=2, max_queue_images=0, queue_budget_ms=0, max_queue_wait_ms=0,
                       poll_interval_s=0)
    yield srv
    srv.stop()


def test_a_worker_behind_on_its_event_loop_sheds_inference_on_http_but_answers_health(lagging_server):
    url = lagging_server.url
    responses, health = [], []
    for _ in range(ROUNDS):
        with ThreadPoolExecutor(16) as pool:
            inferring = [pool.submit(binary_infer, url, BIG) for _ in range(96)]
            probes = [pool.submit(httpx.get, f"{url}/readyz", timeout=30) for _ in range(16)]
            responses += [f.result() for f in inferring]
            health += [f.result() for f in probes]
        if any(r.status_code == 503 for r in responses):
            break
    shed = [r for r in responses if r.status_code == 503]
    assert shed, "no request was shed"
    assert all(r.status_code in (200, 503) for r in responses)
    assert all(int(r.headers["Retry-After"]) >= 1 and "event loop is" in r.json()["error"] for r in shed), \
        [r.text for r in shed][:3]
    assert any(r.status_code == 200 for r in responses)
    assert all(r.status_code == 200 for r in health), "health requests must never be shed"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'cnnserve_shed_requests_total{door="http",reason="loop_lag"}' in metrics
    # the lag it shed on is in the loop-lag histogram: shedding took two timers more than 1 ms late in a row
    buckets = dict(re.findall(r'cnnserve_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([\d.e+]+)', metrics))
    assert float(buckets["+Inf"]) - float(buckets["0.001"]) >= 2, buckets


def test_a_worker_behind_on_its_event_loop_sheds_inference_on_grpc(lagging_server):
    results = []
    for _ in range(ROUNDS):
        results += grpc_flood(lagging_server.grpc_address, typed=True)
        if any(r != "ok" for r in results):
            break
    shed = [r for r in results if r != "ok"]
    assert shed and all("UNAVAILABLE" in r and "event loop is" in r for r in shed), shed[:3]
    assert "ok" in results


def test_a_lone_client_is_not_shed_for_the_lag_its_own_requests_cause_but_several_are(lagging_server):
    # one client, one request at a time, each a large JSON body whose parse keeps the loop busy for milliseconds
    # (past this server's 1 ms limit): the lag is the worker's own work on the last request, not a backlog, so
    # nothing is refused (an outside probe's lone client sending 64^3 volumes got 503s)
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [128, 28, 28],
                        "data": np.random.default_rng(0).integers(0, 256, (128, 28, 28)).tolist()}]}
    with httpx.Client(timeout=30) as client:
        statuses = [client.post(f"{lagging_server.url}/v2/models/mnist-cnn/infer", json=body).status_code
                    for _ in range(30)]
    assert statuses == [200] * 30, statuses
    # the same requests from several clients at once are a backlog: shed (others' bodies count while parsed)
    statuses = []
    for _ in range(ROUNDS):
        with ThreadPoolExecutor(6) as pool:
            statuses += [r.status_code for r in pool.map(lambda _: httpx.post(
                f"{lagging_server.url}/v2/models/mnist-cnn/infer", json=body, timeout=30), range(24))]
        if 503 in statuses:
            break
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses


def test_the_oip_timeout_parameter_is_a_deadline_on_both_doors_and_0_means_none(server):
    """tritonclient's ``timeout=`` (microseconds, in the request's parameters, over HTTP and gRPC alike): a
    deadline the estimate cannot meet is refused before queueing; 0 is no timeout, as in Triton."""
    image = np.zeros((1, 28, 28), np.uint8)
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    http_input = httpclient.InferInput("images", [1, 28, 28], "UINT8")
    http_input.set_data_from_numpy(image, binary_data=True)
    with pytest.raises(InferenceServerException) as refused:
        http.infer("mnist-cnn", [http_input], timeout=1)
    assert refused.value.status() == "504" and "deadline" in refused.value.message()
    assert http.infer("mnist-cnn", [http_input], timeout=0).as_numpy("probs").shape == (1, 10)

    client = grpcclient.InferenceServerClient(server.grpc_address)
    grpc_input = grpcclient.InferInput("images", [1, 28, 28], "UINT8")
    grpc_input.set_data_from_numpy(image)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("mnist-cnn", [grpc_input], timeout=1)
    assert "DEADLINE_EXCEEDED" in refused.value.status() and "deadline" in refused.value.message()
    assert client.infer("mnist-cnn", [grpc_input], timeout=0).as_numpy("probs").shape == (1, 10)
    assert client.infer("mnist-cnn", [grpc_input], timeout=10_000_000).as_numpy("probs").shape == (1, 10)


def test_calls_whose_deadline_passes_while_refused_leave_no_error_in_the_log(server):
    """A call refused for its deadline after grpc core ended it at that deadline: nothing can be sent, and the
    failed send was logged as an ERROR with a traceback (an outside probe, calls with 1 ms deadlines)."""
    async def calls() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="mnist-cnn", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="images", datatype="UINT8", shape=[8, 28, 28])], raw_input_contents=[bytes(8 * 28 * 28)])

            async def one(timeout: float) -> grpc.StatusCode:
                try:
                    await stub.ModelInfer(request, timeout=timeout)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            return await asyncio.gather(*(one(0.0005 * (1 + i % 40)) for i in range(400)))

    log_before = server.log.read_text(errors="replace")
    codes = asyncio.run(calls())
    time.sleep(0.5)
    new_lines = server.log.read_text(errors="replace")[len(log_before):]
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes, set(codes)  # (and refusals: 400 calls at once)
    assert "context.abort(" not in new_lines, new_lines[-3000:]  # no traceback through a failed abort


def test_an_oversize_json_batch_is_refused_from_its_declared_shape_before_parsing(server):
    body = (b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [' + str(MAX_IMAGES + 1).encode()
            + b', 28, 28], "data": [' + b"0, " * 40_000 + b'this is not JSON')  # parsing it would answer 400
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


@pytest.mark.parametrize("path", ["/v2/models/mnist-cnn/infer", "/predict", "/classify"])
def test_a_chunked_oversize_body_is_refused_without_reading_it_all(server, path):
    total, sent = 16 * MAX_BYTES, 0
    chunk = b"0" * 65536
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        content_type = "multipart/form-data; boundary=b" if path == "/classify" else "application/json"
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  f"Content-Type: {content_type}\r\n\r\n".encode())
        if path == "/classify":  # a file part that never ends
            head = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
            s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        try:
            while sent < total and not select.select([s], [], [], 0)[0]:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        while b"over the limit" not in reply and (part := s.recv(65536)):
            reply += part
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line, reply[:300]
    assert b"over the limit" in rest and b"connection: close" in rest.lower()  # the unread rest is not a request
    assert sent < total / 2, f"the server read {sent} bytes of a body over the {MAX_BYTES}-byte limit"


@pytest.mark.parametrize("path", ["/v2/models/mnist-cnn/infer", "/predict"])
def test_a_declared_oversize_body_ends_its_connection(server, path):
    # without Connection: close uvicorn kept the connection and waited for the declared bytes, so the client's
    # next request on it was read as part of the refused body and never answered
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BYTES + 1}\r\n"
                  "Content-Type: application/json\r\n\r\n".encode())
        reply = b""
        while part := s.recv(65536):  # ends when the server closes the connection (a timeout fails the test)
            reply += part
    assert reply.startswith(b"HTTP/1.1 413 ") and b"connection: close" in reply.lower(), reply[:300]


def test_removing_the_serving_version_under_load_strands_no_request(repo, tmp_path):
    models = tmp_path / "repo"
    shutil.copytree(repo / "mnist-cnn" / "1", models / "mnist-cnn" / "1")
    srv = start_server(models, tmp_path / "server.log", workers=1, poll_interval_s=0.2)
    try:
        staging = models / "mnist-cnn" / ".staging"
        shutil.copytree(models / "mnist-cnn" / "1", staging)
        card = json.loads((staging / "model.json").read_text())
        card["version"] = 2
        (staging / "model.json").write_text(json.dumps(card))
        staging.rename(models / "mnist-cnn" / "2")
        images = np.zeros((8, 28, 28), np.uint8)
        deadline = time.monotonic() + 15
        while binary_infer(srv.url, images).json().get("model_version") != "2":
            assert time.monotonic() < deadline, "version 2 was not picked up"
            time.sleep(0.1)

        stop_at = time.monotonic() + 3
        batch = np.zeros((48, 28, 28), np.uint8)  # big enough that the batcher always has work queued

        def hammer(_: int) -> list[tuple[int, float, str]]:
            seen = []
            with httpx.Client(timeout=10) as client:
                while time.monotonic() < stop_at:
                    t0 = time.monotonic()
                    r = binary_infer(srv.url, batch) if _ % 2 else \
                        client.post(f"{srv.url}/predict", json={"instances": images.tolist(), "model": "mnist-cnn"})
                    body = r.json()
                    seen.append((r.status_code, time.monotonic() - t0, body.get("version", body.get("model_version"))))
            return seen

        with ThreadPoolExecutor(8) as pool:
            running = [pool.submit(hammer, i) for i in range(8)]
            time.sleep(1)
            shutil.rmtree(models / "mnist-cnn" / "2")  # the version being served
            results = [row for f in running for row in f.result()]
        assert results and all(status in (200, 503) for status, _, _ in results)
        assert max(seconds for _, seconds, _ in results) < 5, "a request waited on a removed version"
        assert {"1", "2"} <= {version for status, _, version in results if status == 200}
        models_info = httpx.get(f"{srv.url}/models").json()
        assert models_info["default_versions"] == {"mnist-cnn": 1} and "mnist-cnn" in models_info["fallbacks"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'cnnserve_version_fallbacks_total{model="mnist-cnn"} 1.0' in metrics
    finally:
        srv.stop()


def test_sigterm_reports_not_ready_first_and_serves_on_for_the_drain_period(repo, tmp_path):
    health_port = free_port()
    probe = f"http://127.0.0.1:{health_port}"
    srv = start_server(repo, tmp_path / "server.log", workers=1, shutdown_drain_s=3, poll_interval_s=0,
                       health_port=health_port)
    try:
        assert httpx.get(f"{probe}/readyz").json() == {"ready": True}  # the probe port, off the event loop
        assert httpx.get(f"{probe}/livez").status_code == 200
        assert "connection" not in binary_infer(srv.url, np.zeros((1, 28, 28), np.uint8)).headers  # kept alive
        os.kill(srv.process.pid, signal.SIGTERM)  # as Kubernetes does: to the container's first process only
        deadline = time.monotonic() + 2
        while httpx.get(f"{srv.url}/readyz").status_code == 200:
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            time.sleep(0.05)
        with grpc.insecure_channel(srv.grpc_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        r = binary_infer(srv.url, np.zeros((1, 28, 28), np.uint8))  # still answered during the drain
        assert r.status_code == 200
        # and its connection ends with it: no idle keep-alive connection is left for the shutdown to cut
        assert r.headers.get("connection") == "close"
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 503
        assert httpx.get(f"{probe}/readyz").status_code == 503
        assert httpx.get(f"{probe}/livez").status_code == 200  # draining, not dead
        # past the drain the HTTP listener stops, and uvicorn waits for the requests in flight: one whose body
        # trickles in keeps the server there while the probe port is checked (it answered nothing, its thread
        # spinning on the stopped listener, when the drain stopped every listener but gRPC's)
        trickling = threading.Event()
        slow = socket.create_connection(("127.0.0.1", srv.http_port))
        slow.sendall(b"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{")

        def trickle() -> None:
            while not trickling.wait(0.4):  # well inside the test server's 1.5 s body-stall limit
                slow.sendall(b" ")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            time.sleep(4.0)  # SIGTERM + 3 s drain + the listener's stop
            assert srv.process.poll() is None, "the server did not wait for the trickling request"
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{srv.url}/readyz", timeout=2)  # the HTTP listener is stopped ...
            assert httpx.get(f"{probe}/readyz", timeout=2).status_code == 503  # ... the probe port answers
            assert httpx.get(f"{probe}/livez", timeout=2).status_code == 200
            workers = psutil.Process(srv.process.pid).children(recursive=True)
            before = sum(sum(w.cpu_times()[:2]) for w in workers)
            time.sleep(1.0)
            assert sum(sum(w.cpu_times()[:2]) for w in workers) - before < 0.5, "a worker spins while it drains"
        finally:
            trickling.set()
            trickler.join()
            slow.close()
        srv.process.wait(30)  # and then it exits on its own
    finally:
        srv.stop()


def test_a_worker_stopped_alone_leaves_the_server_listening(repo, tmp_path):
    """SIGTERM to one worker (not to the server): it drains and is respawned, and HTTP keeps being accepted: only a
    server whose every worker is stopping takes the shared listening socket out of the listening state."""
    srv = start_server(repo, tmp_path / "server.log", shutdown_drain_s=0.5, poll_interval_s=0)
    try:
        first, second = sorted(srv.worker_pids())[:2]
        os.kill(first, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while first in srv.worker_pids() or len(srv.worker_pids()) < 2:  # drained, exited and respawned
            assert time.monotonic() < deadline, "the worker was not respawned"
            time.sleep(0.2)
        for _ in range(20):  # fresh connections: refused if the listening socket had been shut
            assert httpx.get(f"{srv.url}/readyz", timeout=5).status_code in (200, 503)
        assert second in srv.worker_pids()
    finally:
        srv.stop()
