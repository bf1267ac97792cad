"""Outside clients answered exactly: Triton's statistics and model repository extensions over HTTP and gRPC
(tritonclient), one JSON error shape on every HTTP route, UNIMPLEMENTED without tracebacks, and the
smaller protocol details (per-output binary_data, gRPC contents, upload names, version as a string)."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import threading
import time
import zlib

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from serving.worker_stats import PUBLISH_INTERVAL_S
from tests.server import MAX_BYTES, png, start_server

IMAGES = np.zeros((3, 28, 28), np.uint8)
JSON = "application/json"


def http_stats(client: httpclient.InferenceServerClient, model: str) -> dict:
    [stats] = client.get_inference_statistics(model, "1")["model_stats"]
    return stats


def test_statistics_count_the_requests_of_every_worker(server):
    """Requests on fresh connections spread over the workers; statistics on any connection count them all once
    the workers have published (serving/worker_stats.py)."""
    def success_count() -> int:
        with httpx.Client() as fresh:  # a new connection: any worker
            [stats] = fresh.get(f"{server.url}/v2/models/pneumoniamnist-cnn/versions/1/stats").json()["model_stats"]
        return stats["inference_stats"]["success"]["count"]

    time.sleep(3 * PUBLISH_INTERVAL_S)
    seen = {success_count() for _ in range(4)}
    assert len(seen) == 1, f"the workers disagree before: {seen}"
    [before] = seen
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    for _ in range(8):
        with httpx.Client() as fresh:
            fresh.post(f"{server.url}/v2/models/pneumoniamnist-cnn/versions/1/infer", json=body).raise_for_status()
    time.sleep(3 * PUBLISH_INTERVAL_S)
    assert {success_count() - before for _ in range(4)} == {8}


def test_statistics_count_what_was_sent_over_http_and_grpc(server):
    # the statistics are the answering worker's live counters plus the other workers' as last published: read
    # after a publish interval, they count every request whichever worker took it (a keep-alive connection handed
    # back to spread connections over the workers moved the client to the other worker mid-test, once in a CI run)
    http = httpclient.InferenceServerClient(server.http_address, concurrency=1)
    grpc_client = grpcclient.InferenceServerClient(server.grpc_address)
    time.sleep(3 * PUBLISH_INTERVAL_S)  # the other workers' counts of earlier tests are in the statistics by now
    before = http_stats(http, "pneumoniamnist-cnn")
    inp = httpclient.InferInput("images", list(IMAGES.shape), "UINT8")
    inp.set_data_from_numpy(IMAGES)
    for _ in range(4):
        http.infer("pneumoniamnist-cnn", [inp], model_version="1")
    time.sleep(3 * PUBLISH_INTERVAL_S)
    after = http_stats(http, "pneumoniamnist-cnn")
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 4
    assert after["name"] == "pneumoniamnist-cnn" and after["version"] == "1" and after["execution_count"] >= 1
    inference = after["inference_stats"]
    assert inference["success"]["ns"] > 0 and inference["queue"]["count"] >= 4 and inference["compute_infer"]["ns"] > 0
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    assert inference["compute_input"]["count"] == inference["compute_infer"]["count"] == \
        inference["compute_output"]["count"]  # perf_analyzer refuses statistics where they differ
    assert {m["name"] for m in http.get_inference_statistics()["model_stats"]} >= {"mnist-cnn", "pneumoniamnist-cnn"}

    time.sleep(3 * PUBLISH_INTERVAL_S)
    g_before = grpc_client.get_inference_statistics("pneumoniamnist-cnn", "1", as_json=True)["model_stats"][0]
    ginp = grpcclient.InferInput("images", list(IMAGES.shape), "UINT8")
    ginp.set_data_from_numpy(IMAGES)
    for _ in range(5):
        grpc_client.infer("pneumoniamnist-cnn", [ginp], model_version="1")
    time.sleep(3 * PUBLISH_INTERVAL_S)
    g_after = grpc_client.get_inference_statistics("pneumoniamnist-cnn", "1", as_json=True)["model_stats"][0]
    assert int(g_after["inference_count"]) - int(g_before.get("inference_count", 0)) == 15
    assert int(g_after["inference_stats"]["success"]["count"]) - \
        int(g_before["inference_stats"].get("success", {}).get("count", 0)) == 5
    with pytest.raises(InferenceServerException, match="not found"):
        http.get_inference_statistics("nope")


def test_the_stats_path_is_not_taken_for_a_model_named_stats(server):
    r = httpx.get(f"{server.url}/v2/models/stats")
    assert r.status_code == 200 and "model_stats" in r.json()


def test_repository_index_and_unload_load_over_http_and_grpc(server):
    http = httpclient.InferenceServerClient(server.http_address)
    grpc_client = grpcclient.InferenceServerClient(server.grpc_address)
    index = {(m["name"], m["version"]): m for m in http.get_model_repository_index()}
    assert index[("mnist-cnn", "1")]["state"] == "READY"
    gindex = grpc_client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "mnist-cnn", "version": "1", "state": "READY"}.items() <= gindex[0].items() or \
        any(m["name"] == "mnist-cnn" and m["state"] == "READY" for m in gindex)

    model = "retinamnist-tiny"

    def on_every_worker(ready: bool) -> bool:
        """Whether 6 requests on fresh connections (which land on either worker) all see ``model`` so."""
        for _ in range(6):
            r = httpx.get(f"{server.url}/v2/models/{model}/ready")
            if (r.status_code == 200) != ready or (not ready and "unloaded" not in r.json()["error"]):
                return False
        return True

    def settle(ready: bool, what: str) -> None:
        deadline = time.monotonic() + 10  # the other workers follow at their next poll
        while not on_every_worker(ready):
            assert time.monotonic() < deadline, f"{what} did not reach every worker"
            time.sleep(0.2)

    http.unload_model(model)
    settle(False, "unload")
    rows = [m for m in http.get_model_repository_index() if m["name"] == model]  # Triton's: one per version
    assert rows and all(m["state"] == "UNAVAILABLE" and m["reason"] == "unloaded" and m["version"].isdigit()
                        for m in rows), rows
    grpc_client.load_model(model)
    settle(True, "load")
    grpc_client.unload_model(model)
    http.load_model(model)
    with pytest.raises(InferenceServerException, match="not found"):
        http.load_model("nope")
    with pytest.raises(InferenceServerException, match="not found"):
        grpc_client.unload_model("nope")


@pytest.mark.parametrize("method,path", [
    ("GET", "/nope"), ("GET", "/v2/nope"), ("GET", "/v2/models/nope"), ("GET", "/models/nope"),
    ("GET", "/v2/models/mnist-cnn/infer"), ("POST", "/v2/models/mnist-cnn/infer"), ("POST", "/predict"),
    ("POST", "/classify"), ("POST", "/v2/repository/models/nope/load"),
])
def test_every_http_route_family_answers_errors_as_one_json_shape(server, method, path):
    r = httpx.request(method, f"{server.url}{path}", content=b"{}" if method == "POST" else None,
                      headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and len(body["error"]) > 5, body


def test_unimplemented_grpc_methods_answer_unimplemented_with_a_message_and_no_traceback(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CudaSharedMemoryStatus is not implemented" in info.value.details()
    time.sleep(0.2)
    log = server.log.read_text()
    assert "NotImplementedError" not in log and "Traceback (most recent call last)" not in log  # 4xx: no tracebacks


def test_grpc_contents_in_the_wrong_field_or_twice_is_a_clear_error(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # FP32 data where UINT8 belongs is named as such; FP32 data declared FP32 is the datatype error it is
        for datatype, expected in (("UINT8", "fp32_contents"), ("FP32", "takes UINT8")):
            tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype=datatype, shape=[1, 28, 28])
            tensor.contents.fp32_contents.extend([0.0] * 784)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(pb.ModelInferRequest(model_name="mnist-cnn", inputs=[tensor]))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in info.value.details()
        tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 28, 28])
        tensor.contents.uint_contents.extend([0] * 784)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="mnist-cnn", inputs=[tensor],
                                                 raw_input_contents=[bytes(784)]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "both" in info.value.details()
        assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready  # Triton's answer, not an error


def test_an_outputs_own_binary_data_false_wins_over_binary_data_output(server):
    body = {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
            "outputs": [{"name": "probs", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True}}
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", json=body)
    assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 10


def test_classify_answers_version_as_a_string_and_names_the_upload_in_errors(server):
    r = httpx.post(f"{server.url}/classify", files=[("images", ("digit.png", png(IMAGES[0]), "image/png"))],
                   data={"model": "mnist-cnn", "version": "1"})
    assert r.status_code == 200 and r.json()["version"] == "1"
    r = httpx.post(f"{server.url}/classify", files=[("images", ("holiday-photo.gif", b"GIF89a....", "image/gif"))],
                   data={"model": "mnist-cnn"})
    assert 400 <= r.status_code < 500 and "holiday-photo.gif" in r.json()["error"]


def classified(results: np.ndarray) -> list[list[tuple[float, int, str]]]:
    """Triton's classification strings "<probability>:<index>:<label>", parsed, per image (tritonclient gives str
    from JSON, bytes from binary data)."""
    return [[(float(p), int(i), label) for p, i, label in ((v.decode() if isinstance(v, bytes) else v).split(":", 2)
                                                             for v in row)] for row in results]


def test_classification_extension_answers_the_top_classes_on_both_doors(server):
    """tritonclient's ``class_count`` (the output's ``classification`` parameter): the top classes of each image,
    best first, as BYTES "<probability>:<index>:<label>" of shape (images, count), JSON, binary and gRPC alike."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = httpx.get(f"{server.url}/v2/models/mnist-cnn").json()["parameters"]["labels"]
    assert "classification" in httpx.get(f"{server.url}/v2").json()["extensions"]

    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    http_input = httpclient.InferInput("images", list(images.shape), "UINT8")
    http_input.set_data_from_numpy(images)
    probs = http.infer("mnist-cnn", [http_input]).as_numpy("probs")
    expected = [[(pytest.approx(float(row[i]), abs=1e-6), int(i), labels[i]) for i in np.argsort(-row)[:3]]
                for row in probs]
    answers = []
    for binary in (False, True):
        output = httpclient.InferRequestedOutput("probs", binary_data=binary, class_count=3)
        answers.append(http.infer("mnist-cnn", [http_input], outputs=[output]).as_numpy("probs"))
    client = grpcclient.InferenceServerClient(server.grpc_address)
    grpc_input = grpcclient.InferInput("images", list(images.shape), "UINT8")
    grpc_input.set_data_from_numpy(images)
    answers.append(client.infer("mnist-cnn", [grpc_input], outputs=[grpcclient.InferRequestedOutput(
        "probs", class_count=3)]).as_numpy("probs"))
    for answer in answers:
        assert answer.shape == (3, 3)
        assert classified(answer) == expected

    too_many = httpclient.InferRequestedOutput("probs", class_count=50)  # more than there are: every class
    assert http.infer("mnist-cnn", [http_input], outputs=[too_many]).as_numpy("probs").shape == (3, len(labels))
    bad = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", json={
        "inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
        "outputs": [{"name": "probs", "parameters": {"classification": "three"}}]})
    assert bad.status_code == 400 and "classification" in bad.json()["error"]


def test_statistics_never_go_back_whichever_worker_answers(server):
    """Polls on fresh connections (either worker) while requests run: inference_count only grows (tools take
    deltas between polls)."""
    stop = threading.Event()

    def load() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                client.post(f"{server.url}/v2/models/mnist-cnn/versions/1/infer", json={"inputs": [
                    {"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]})

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        counts = []
        for _ in range(80):
            with httpx.Client() as fresh:
                [stats] = fresh.get(f"{server.url}/v2/models/mnist-cnn/versions/1/stats").json()["model_stats"]
            counts.append(stats["inference_count"])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    drops = [(a, b) for a, b in itertools.pairwise(counts) if b < a]
    assert not drops and counts[-1] > counts[0], drops[:5]


@pytest.mark.parametrize("poll_interval_s", [30, 0])
def test_every_worker_follows_an_unload_and_a_load_at_once_not_a_poll_later(repo, tmp_path, poll_interval_s):
    """A server that scans its repository every 30 s, or never on a timer (0): the worker that did not answer the
    call follows an unload and a load at once (it watches the shared unloaded set), as Triton's synchronous load
    would have it. Each worker logs what its scan changed, with its worker number."""
    slow_poll = start_server(repo, tmp_path / "server.log", poll_interval_s=poll_interval_s)
    try:
        def seconds_until_both_workers_logged(change: str, scan: str = "model repository: ") -> float:
            start = time.monotonic()
            while time.monotonic() - start < 10:
                log = slow_poll.log.read_text().splitlines()
                lines = [line for line in log if f"{scan}{change}" in line]
                if {re.search(r"cnnserve:(\d+)\]", line)[1] for line in lines} >= {"1", "2"}:
                    return time.monotonic() - start
                time.sleep(0.05)
            return float("inf")

        def readiness_on_fresh_connections() -> set[int]:  # each lands on either worker
            return {httpx.get(f"{slow_poll.url}/v2/models/mnist-cnn/ready").status_code for _ in range(8)}

        # both workers up and serving it (a worker still starting read the unloaded state at its first scan)
        assert seconds_until_both_workers_logged("loaded mnist-cnn/1", scan=f"model repository {repo}: ") < 10
        assert httpx.post(f"{slow_poll.url}/v2/repository/models/mnist-cnn/unload").status_code == 200
        # answered once every worker has followed (an outside probe: 2 of 8 calls just after still found it ready)
        assert readiness_on_fresh_connections() == {503}
        assert seconds_until_both_workers_logged("removed mnist-cnn/1") < 2.0  # a poll: 30 s
        assert httpx.post(f"{slow_poll.url}/v2/repository/models/mnist-cnn/load").status_code == 200
        assert readiness_on_fresh_connections() == {200}
        assert seconds_until_both_workers_logged("loaded mnist-cnn/1") < 2.0
    finally:
        slow_poll.stop()


def test_compressed_requests_are_decoded_as_tritons_clients_send_them(server):
    """tritonclient's request_compression_algorithm (gzip, deflate: the Inference-Header-Content-Length counts the
    decoded body) answers as the uncompressed request; another coding is a 415, a bomb past the limit a 413."""
    client = httpclient.InferenceServerClient(server.http_address)
    tensor = httpclient.InferInput("images", list(IMAGES.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGES)
    plain = client.infer("mnist-cnn", [tensor]).as_numpy("probs")
    for algorithm in ("gzip", "deflate"):
        np.testing.assert_array_equal(
            client.infer("mnist-cnn", [tensor], request_compression_algorithm=algorithm).as_numpy("probs"), plain)
    body = {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", json=body, headers={"content-encoding": "br"})
    assert r.status_code == 415 and "'br'" in r.json()["error"]
    bomb = zlib.compress(b" " * (2 * MAX_BYTES))
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", content=bomb,
                   headers={"content-encoding": "deflate", "content-type": "application/json"})
    assert r.status_code == 413 and "decodes to more than" in r.json()["error"]
    # gzip is a series of members (RFC 1952): an outside probe's two-member body was read to its first member's end
    # ("malformed JSON"), while garbage after one member was ignored
    raw, url = json.dumps(body).encode(), f"{server.url}/v2/models/mnist-cnn/infer"
    headers = {"content-encoding": "gzip", "content-type": "application/json"}
    r = httpx.post(url, content=gzip.compress(raw[:100]) + gzip.compress(raw[100:]), headers=headers)
    assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "probs", r.text
    r = httpx.post(url, content=gzip.compress(raw) + b"garbage", headers=headers)
    assert r.status_code == 400 and "after the end of its compressed data" in r.json()["error"], r.text


def test_predict_decodes_its_content_encoding_as_the_oip_door_does_and_classify_refuses_one(server):
    """An outside probe: a gzip body to /predict was "Invalid JSON", and a plain one labelled br was answered."""
    raw = json.dumps({"model": "mnist-cnn", "instances": IMAGES.tolist()}).encode()
    url, as_json = f"{server.url}/predict", {"content-type": "application/json"}
    plain = httpx.post(url, content=raw, headers=as_json).json()
    for coding, body in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw)), ("GZIP", gzip.compress(raw))):
        r = httpx.post(url, content=body, headers={**as_json, "content-encoding": coding})
        assert r.status_code == 200 and r.json() == plain, (coding, r.text)
    r = httpx.post(url, content=raw, headers={**as_json, "content-encoding": "br"})
    assert r.status_code == 415 and "'br'" in r.json()["error"]
    r = httpx.post(url, content=raw, headers={**as_json, "content-encoding": "gzip"})  # said gzip, was not
    assert r.status_code == 400 and "not valid gzip data" in r.json()["error"]
    bomb = zlib.compress(b" " * (2 * MAX_BYTES))
    r = httpx.post(url, content=bomb, headers={**as_json, "content-encoding": "deflate"})
    assert r.status_code == 413 and "decodes to more than" in r.json()["error"]
    r = httpx.post(f"{server.url}/classify", files=[("images", ("d.npy", b"x", "application/octet-stream"))],
                   data={"model": "mnist-cnn"}, headers={"content-encoding": "gzip"})
    assert r.status_code == 415 and "without a Content-Encoding" in r.json()["error"]
    assert httpx.post(url, content=raw, headers=as_json).json() == plain  # and the server goes on


def test_a_lone_surrogate_id_is_echoed_and_boolean_parameters_are_booleans(server):
    url = f"{server.url}/v2/models/mnist-cnn/infer"
    tensor = '{"name":"images","shape":[1,28,28],"datatype":"UINT8","data":[' + ",".join(["0"] * 784) + "]}"
    body = '{"id":"\\ud800","inputs":[' + tensor + "]}"  # legal JSON, not encodable as UTF-8
    r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["id"] == "\ud800"
    for where in ('"parameters":{"binary_data_output":"false"}',
                  '"outputs":[{"name":"probs","parameters":{"binary_data":"false"}}]'):
        r = httpx.post(url, content='{"inputs":[' + tensor + "]," + where + "}",
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "must be a boolean" in r.json()["error"]


def test_a_405_keeps_its_allow_header(server):
    r = httpx.get(f"{server.url}/v2/models/mnist-cnn/infer")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and "error" in r.json()


def test_undecodable_grpc_requests_are_invalid_arguments_without_tracebacks(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as info:
            infer(b"\x0a\x02\xff\xfe")  # model_name (field 1): invalid UTF-8
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in info.value.details()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live  # still serving
    assert "Traceback" not in server.log.read_text()


def test_requests_as_other_clients_build_them_are_answered(server):
    """Found by an outside probe with KServe's and MLServer's clients, curl and fetch, each refused before."""
    infer = f"{server.url}/v2/models/mnist-cnn/infer"
    tensor = {"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}
    body = json.dumps({"inputs": [tensor]})
    # curl -d (form-urlencoded) and fetch() with a string body (text/plain) send JSON without saying so (415)
    for content_type in ("application/x-www-form-urlencoded", "text/plain;charset=UTF-8"):
        r = httpx.post(infer, content=body, headers={"content-type": content_type})
        assert r.status_code == 200, (content_type, r.text)
    # /predict alike: curl -d's form-urlencoded was parsed as a form ("instances: Field required"), a BOM refused
    predict = json.dumps({"model": "mnist-cnn", "instances": [[0] * 28] * 28}).encode()
    for content, content_type in ((predict, "application/x-www-form-urlencoded"),
                                  (b"\xef\xbb\xbf" + predict, "application/json")):
        r = httpx.post(f"{server.url}/predict", content=content, headers={"content-type": content_type})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1, (content_type, r.text)
    # a parameter called "shape" before the inputs was read as the declared batch (413 "batch of 5000 images")
    for body in ({"parameters": {"shape": [5000]}, "inputs": [tensor]},
                 {"outputs": [{"name": "probs", "parameters": {"shape": [9999]}}], "inputs": [tensor]},
                 {"inputs": [{"parameters": {"shape": [5000]}, **tensor}]}):  # a tensor's own, before its shape
        r = httpx.post(infer, content=json.dumps(body), headers={"content-type": JSON})
        assert r.status_code == 200, (body, r.text)
    # kserve's client writes "data": null beside binary data: no data, not "both data and binary_data_size"
    for images in (1, 0):
        header = json.dumps({"inputs": [{**tensor, "shape": [images, 28, 28], "data": None,
                                         "parameters": {"binary_data_size": 784 * images}}]}).encode()
        r = httpx.post(infer, content=header + bytes(784 * images), headers={
            "content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
        if images:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400 and "at least one image" in r.json()["error"], r.text


def test_stream_infer_answers_each_request_by_id_and_errors_without_ending_the_stream(server):
    """Triton's ModelStreamInfer as tritonclient streams it: every request gets its own answer carrying its id,
    the same probabilities as a unary call; a bad request is an error on the stream, which goes on serving."""
    client = grpcclient.InferenceServerClient(server.grpc_address)
    rng = np.random.default_rng(7)
    images = {str(i): rng.integers(0, 256, (1 + i % 3, 28, 28), dtype=np.uint8) for i in range(40)}
    answers: dict[str, np.ndarray] = {}
    errors: list[str] = []
    done = threading.Event()

    def on_answer(result, error) -> None:
        if error is not None:
            errors.append(error.message())
        else:
            response = result.get_response()
            assert response.parameters["triton_final_response"].bool_param  # what Triton's clients wait for
            answers[response.id] = result.as_numpy("probs")
        if len(answers) + len(errors) == len(images) + 2:
            done.set()

    def infer_input(batch: np.ndarray, datatype: str = "UINT8") -> grpcclient.InferInput:
        tensor = grpcclient.InferInput("images", list(batch.shape), datatype)
        tensor.set_data_from_numpy(batch if datatype == "UINT8" else batch.astype(np.float32))
        return tensor

    client.start_stream(callback=on_answer)
    try:
        ids = list(images)
        for request_id in ids[:20]:
            client.async_stream_infer("mnist-cnn", [infer_input(images[request_id])], request_id=request_id)
        client.async_stream_infer("mnist-cnn", [infer_input(images["0"], "FP32")], request_id="wrong-type")
        client.async_stream_infer("no-such-model", [infer_input(images["0"])], request_id="no-model")
        for request_id in ids[20:]:
            client.async_stream_infer("mnist-cnn", [infer_input(images[request_id])], request_id=request_id)
        assert done.wait(30), f"{len(answers)} answers and {len(errors)} errors of {len(images) + 2}"
    finally:
        client.stop_stream()
    assert sorted(answers) == sorted(images)
    for request_id in ("0", "17", "39"):
        unary = client.infer("mnist-cnn", [infer_input(images[request_id])]).as_numpy("probs")
        np.testing.assert_allclose(answers[request_id], unary, rtol=1e-5, atol=1e-6)
    assert len(errors) == 2 and any("FP32" in e for e in errors) and any("no-such-model" in e for e in errors), errors


def test_stream_infer_answers_an_undecodable_message_on_the_stream(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")  # raw bytes both ways
        good = pb.ModelInferRequest(model_name="mnist-cnn", id="good", raw_input_contents=[bytes(784)],
                                    inputs=[pb.ModelInferRequest.InferInputTensor(
                                        name="images", datatype="UINT8", shape=[1, 28, 28])])
        responses = [pb.ModelStreamInferResponse.FromString(r)
                     for r in stream(iter([b"\x0a\x02\xff\xfe", good.SerializeToString()]), timeout=30)]
    assert len(responses) == 2
    [bad] = [r for r in responses if r.error_message]
    [answer] = [r.infer_response for r in responses if not r.error_message]
    assert "protobuf" in bad.error_message and answer.id == "good" and answer.outputs[0].shape == [1, 10]
    assert "Traceback" not in server.log.read_text()


def test_a_stream_is_paced_to_what_the_model_admits_never_refused_for_its_own_backlog(server):
    """An outside probe: one stream sending 200 requests of 32 images at once had 188 refused as overloaded (its
    own 64 requests in progress were more than the queue budget admits)."""
    client = grpcclient.InferenceServerClient(server.grpc_address)
    batch = np.random.default_rng(3).integers(0, 256, (32, 28, 28), dtype=np.uint8)
    tensor = grpcclient.InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    outcomes: list[str | None] = []
    done = threading.Event()

    def on_answer(result, error) -> None:
        outcomes.append(None if error is None else error.message())
        if len(outcomes) == 150:
            done.set()

    rejected_before = rejected_on_grpc(server.url)
    client.start_stream(callback=on_answer)
    try:
        for i in range(150):
            client.async_stream_infer("mnist-cnn", [tensor], request_id=str(i))
        assert done.wait(120), f"{len(outcomes)} of 150 answered"
    finally:
        client.stop_stream()
    refused = [o for o in outcomes if o is not None]
    assert not refused, f"{len(refused)} of 150 refused, e.g. {refused[0]}"
    assert rejected_on_grpc(server.url) == rejected_before  # it waited for room: nothing was refused, or counted


def rejected_on_grpc(url: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith("cnnserve_requests_total{") and 'door="oip-grpc"' in line
               and 'outcome="rejected"' in line)


def test_a_stream_outlives_its_connections_age(repo, tmp_path):
    """The connection age re-spreads channels; a stream on an aged connection runs to its end (a grace of the
    request timeout cut every stream at about 90 s, its requests in flight unanswered)."""
    srv = start_server(repo, tmp_path / "server.log", workers=1, grpc_max_connection_age_s=1, request_timeout_s=2)
    request = pb.ModelInferRequest(model_name="mnist-cnn", raw_input_contents=[bytes(784)], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 28, 28])])

    def slowly():
        for i in range(10):
            time.sleep(0.5)
            request.id = str(i)
            yield request

    try:
        with grpc.insecure_channel(srv.grpc_address) as channel:
            answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(slowly(), timeout=60))
    finally:
        srv.stop()
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(10)]
    assert not any(a.error_message for a in answers)


def refused_without_a_model(url: str) -> dict[str, float]:
    """``cnnserve_requests_total`` of requests refused before a model took them (label model=""), by door."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("cnnserve_requests_total{") and 'model=""' in line and 'outcome="invalid"' in line:
            door = re.search(r'door="([^"]+)"', line)[1]
            counts[door] = counts.get(door, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_every_refused_inference_request_is_counted_on_its_door(server):
    """An outside probe: one in five bad requests reached cnnserve_requests_total (only those DataPlane.infer saw)."""
    before = refused_without_a_model(server.url)
    wrong = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    assert httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", json=wrong).status_code == 400
    assert httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", content=b"{not json").status_code == 400
    assert httpx.post(f"{server.url}/predict", json={"model": "mnist-cnn", "instances": [[True, 2]]}).status_code == 400
    client = grpcclient.InferenceServerClient(server.grpc_address)
    tensor = grpcclient.InferInput("images", [1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("mnist-cnn", [tensor])
    after = refused_without_a_model(server.url)
    gained = {door: after.get(door, 0.0) - before.get(door, 0.0) for door in after}
    assert gained.get("oip-rest") == 2 and gained.get("predict") == 1 and gained.get("oip-grpc") == 1, gained


def test_errors_an_outside_probe_found_unclear_say_what_was_wrong(server):
    infer = f"{server.url}/v2/models/mnist-cnn/infer"
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    # binary data without the header length, with the body's length, or with one counted in characters (short)
    for length in (None, str(len(header) + 784), str(len(header) - 2)):
        headers = {} if length is None else {"Inference-Header-Content-Length": length}
        r = httpx.post(infer, content=header + bytes(784), headers=headers)
        given = "it is missing" if length is None else f"it says {length}"
        assert r.status_code == 400 and f"the JSON header's length, {len(header)} ({given})" in r.json()["error"]
    as_text = header.replace(b"784", b'"784"')
    r = httpx.post(infer, content=as_text + bytes(784), headers={"Inference-Header-Content-Length": str(len(as_text))})
    assert r.status_code == 400 and "binary_data_size must be a number of bytes" in r.json()["error"]
    body = {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    r = httpx.post(infer, json={**body, "outputs": [{"parameters": {"classification": 2}}]})
    assert r.status_code == 400 and "each requested output needs a 'name'" in r.json()["error"]
    r = httpx.post(infer, json={**body, "outputs": [{"name": "logits"}]})  # the card lists it: the file has it
    assert r.status_code == 400 and "'logits' is in the model file for offline analysis" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/versions/9/infer", json=body)
    assert r.status_code == 404 and "has no version 9; its versions: 1, 2, 3" in r.json()["error"]
    r = httpx.post(infer, json={**body, "parameters": {"timeout": 1}})  # 1 µs
    assert r.status_code == 504 and re.search(r"passed \d\.\d+ ms before", r.json()["error"]), r.text
    assert "0.0 ms" not in r.json()["error"]
    r = httpx.post(infer, json={**body, "outputs": [{"name": ["probs"]}]})  # a list as a name: a 500 before
    assert r.status_code == 400 and "each requested output needs a 'name'" in r.json()["error"]
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        empty = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 28, 28])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="mnist-cnn", inputs=[empty]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="mnist-cnn", model_version="9", inputs=[empty],
                                                 raw_input_contents=[bytes(784)]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "its versions: 1, 2, 3" in info.value.details()


def test_contradictions_and_loose_values_an_outside_probe_sent_are_refused(server):
    body = {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    infer = f"{server.url}/v2/models/mnist-cnn/infer"
    r = httpx.post(infer, json={**body, "model_name": "pneumoniamnist-cnn"})  # served by mnist-cnn before
    assert r.status_code == 400 and "the URL picks the model" in r.json()["error"], r.text
    r = httpx.post(infer, json={**body, "model_name": "mnist-cnn", "model_version": "1"})  # the URL's is version 3
    assert r.status_code == 400 and "/v2/models/mnist-cnn/versions/1/infer" in r.json()["error"], r.text
    assert httpx.post(infer, json={**body, "model_name": "mnist-cnn", "model_version": "3"}).status_code == 200
    r = httpx.post(f"{server.url}/v2/repository/index", json={"ready": "yes"})  # listed every model
    assert r.status_code == 400 and "'ready' must be true or false" in r.json()["error"], r.text
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:  # every model's statistics were answered
            stub.ModelStatistics(pb.ModelStatisticsRequest(version="2"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "need the model's name" in info.value.details()
