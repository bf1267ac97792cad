"""At least 30 distinct bad requests on each of the three doors: each gets a 4xx-class answer with a
message, then a good request is answered right, and no worker restarted."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import socket
import struct
import time
import zlib

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.conftest import EXPORTS
from tests.server import HEADER_TIMEOUT_S, MAX_BYTES, MAX_IMAGES, png, start_server

GOOD = np.zeros((1, 28, 28), np.uint8)


def infer_json(inputs, **extra) -> dict:
    return {"inputs": inputs, **extra}


def tensor(shape=(1, 28, 28), datatype="UINT8", name="images", data=None) -> dict:
    n = int(np.prod(shape)) if all(isinstance(d, int) and d >= 0 for d in shape) else 1
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": [0] * n if data is None else data}


def binary_request(header: dict, payload: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head)),
                            "Content-Type": "application/octet-stream"}


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG file that claims a huge 1-bit image: the decoder must refuse it before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * (width // 8)
    raw = zlib.compress(row * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG")
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def assert_client_error(response: httpx.Response, what: str) -> None:
    assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    assert response.text.strip(), f"{what}: empty error body"
    body = response.json()
    assert isinstance(body, dict), f"{what}: the error is not the service's one shape, a JSON object: {body}"
    message = body.get("error")
    assert isinstance(message, str) and len(message) > 10, f"{what}: no message in {body}"


def test_bentoml_http_door_rejects_30_bad_requests(server):
    url = server.url
    image = GOOD[0]
    good_png = png(image)
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)  # compresses badly: long files
    pids = server.worker_pids()
    predict = f"{url}/predict"
    classify = f"{url}/classify"
    big = np.zeros((MAX_IMAGES + 1, 28, 28), np.uint8).tolist()
    cases = [
        ("unknown model", lambda: httpx.post(predict, json={"instances": image.tolist(), "model": "nope"})),
        ("unknown version", lambda: httpx.post(predict, json={"instances": image.tolist(), "model": "mnist-cnn",
                                                              "version": "99"})),
        ("non-integer version", lambda: httpx.post(predict, json={"instances": image.tolist(), "model": "mnist-cnn",
                                                                  "version": "latest!"})),
        ("wrong shape", lambda: httpx.post(predict, json={"instances": np.zeros((28, 27)).tolist(),
                                                          "model": "mnist-cnn"})),
        ("wrong rank", lambda: httpx.post(predict, json={"instances": [1, 2, 3], "model": "mnist-cnn"})),
        ("empty batch", lambda: httpx.post(predict, json={"instances": [], "model": "mnist-cnn"})),
        ("value over 255", lambda: httpx.post(predict, json={"instances": np.full((28, 28), 256).tolist(),
                                                             "model": "mnist-cnn"})),
        ("negative value", lambda: httpx.post(predict, json={"instances": np.full((28, 28), -1).tolist(),
                                                             "model": "mnist-cnn"})),
        ("NaN", lambda: httpx.post(predict, content=json.dumps({"instances": np.full((28, 28), np.nan).tolist(),
                                                               "model": "mnist-cnn"}),
                                   headers={"content-type": "application/json"})),
        ("infinity", lambda: httpx.post(predict, content=json.dumps({"instances": np.full((28, 28), np.inf).tolist(),
                                                                    "model": "mnist-cnn"}),
                                        headers={"content-type": "application/json"})),
        ("fractions", lambda: httpx.post(predict, json={"instances": np.full((28, 28), 0.5).tolist(),
                                                        "model": "mnist-cnn"})),
        ("strings", lambda: httpx.post(predict, json={"instances": [["a"] * 28] * 28, "model": "mnist-cnn"})),
        ("ragged", lambda: httpx.post(predict, json={"instances": [[0] * 28, [0] * 27], "model": "mnist-cnn"})),
        ("a boolean among the numbers", lambda: httpx.post(predict, json={"instances": [[0] * 28] * 27 + [
            [False] + [0] * 27], "model": "mnist-cnn"})),
        ("malformed JSON", lambda: httpx.post(predict, content=b'{"instances": [[0, 1', headers={
            "content-type": "application/json"})),
        ("missing instances", lambda: httpx.post(predict, json={"model": "mnist-cnn"})),
        ("instances not a list", lambda: httpx.post(predict, json={"instances": "pixels", "model": "mnist-cnn"})),
        ("batch over the limit", lambda: httpx.post(predict, json={"instances": big, "model": "mnist-cnn"})),
        ("top_k not an integer", lambda: httpx.post(predict, json={"instances": image.tolist(), "model": "mnist-cnn",
                                                                   "top_k": "many"})),
        ("top_k zero", lambda: httpx.post(predict, json={"instances": image.tolist(), "model": "mnist-cnn",
                                                         "top_k": 0})),
        ("wrong content type", lambda: httpx.post(predict, content=b"instances=1", headers={
            "content-type": "text/plain"})),
        ("body over the size limit", lambda: httpx.post(predict, content=b"[" + b"0," * (MAX_BYTES // 2) + b"0]",
                                                        headers={"content-type": "application/json"})),
        ("no model with several loaded", lambda: httpx.post(predict, json={"instances": image.tolist()})),
        ("non-image bytes", lambda: httpx.post(classify, files=[("images", ("x.png", b"hello world", "image/png"))],
                                               data={"model": "mnist-cnn"})),
        ("truncated PNG", lambda: httpx.post(classify, files=[("images", ("t.png", png(noise)[:-200], "image/png"))],
                                             data={"model": "mnist-cnn"})),
        ("truncated JPEG", lambda: httpx.post(classify, files=[("images", ("t.jpg", jpeg(noise)[:-200], "image/jpeg"))],
                                              data={"model": "mnist-cnn"})),
        ("decompression bomb", lambda: httpx.post(classify, files=[("images", ("b.png", bomb_png(), "image/png"))],
                                                  data={"model": "mnist-cnn"})),
        ("empty file", lambda: httpx.post(classify, files=[("images", ("e.png", b"", "image/png"))],
                                          data={"model": "mnist-cnn"})),
        ("no files", lambda: httpx.post(classify, data={"model": "mnist-cnn"})),
        ("classify unknown model", lambda: httpx.post(classify, files=[("images", ("a.png", good_png, "image/png"))],
                                                      data={"model": "nope"})),
        ("ICO not accepted", lambda: httpx.post(classify, files=[("images", ("a.ico", _ico(image), "image/x-icon"))],
                                                data={"model": "mnist-cnn"})),
        ("npy wrong dtype", lambda: httpx.post(classify, files=[("images", ("v.npy", npy(image.astype(np.float32)),
                                                                            "application/x-npy"))],
                                               data={"model": "mnist-cnn"})),
        ("npy wrong shape", lambda: httpx.post(classify, files=[("images", ("v.npy", npy(np.zeros((5, 5), np.uint8)),
                                                                            "application/x-npy"))],
                                               data={"model": "mnist-cnn"})),
        ("npy corrupt", lambda: httpx.post(classify, files=[("images", ("v.npy", npy(image)[:70], "x/npy"))],
                                           data={"model": "mnist-cnn"})),
        ("2D image for a 3D model", lambda: httpx.post(classify, files=[("images", ("a.png", good_png, "image/png"))],
                                                       data={"model": "organmnist3d-tiny"})),
        ("unknown card path", lambda: httpx.get(f"{url}/models/nope")),
        ("file in a misspelt field", lambda: httpx.post(classify, files=[("image", ("a.png", good_png, "image/png"))],
                                                        data={"model": "mnist-cnn"})),
        ("file as the model name", lambda: httpx.post(classify, files=[("images", ("a.png", good_png, "image/png")),
                                                                       ("model", ("m.png", good_png, "image/png"))])),
        ("multipart file to predict", lambda: httpx.post(predict, files=[("instances", ("a.png", good_png,
                                                                                        "image/png"))],
                                                         data={"model": "mnist-cnn"})),
        ("text in the file field", lambda: httpx.post(classify, data={"model": "mnist-cnn", "images": "notaurl"})),
        ("a URL in the file field", lambda: httpx.post(classify, data={"model": "mnist-cnn",
                                                                        "images": "http://example.com/a.png"})),
        ("truncated JPEG header", lambda: httpx.post(classify, files=[("images", ("a.jpg", _jpeg(image)[:60],
                                                                                  "image/jpeg"))],
                                                     data={"model": "mnist-cnn"})),
    ]
    assert len(cases) >= 30
    for what, call in cases:
        response = call()
        assert_client_error(response, what)
        if what.startswith(("file ", "multipart file")):
            assert "holds a file" in response.json()["error"], response.text
    r = httpx.post(predict, json={"instances": image.tolist(), "model": "mnist-cnn"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in [str(d) for d in range(10)]
    assert server.worker_pids() == pids


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG")
    return buf.getvalue()


def test_a_long_upload_name_is_shortened_not_a_500(server):
    name = "scan-" + "é" * 150 + ".png"  # 305 bytes of UTF-8: over a file name's 255
    r = httpx.post(f"{server.url}/classify", files=[("images", (name, _png_digit(), "image/png"))],
                   data={"model": "mnist-cnn"})
    assert r.status_code == 200 and r.json()["results"][0]["label"] in [str(d) for d in range(10)]


def _png_digit() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.eye(28, dtype=np.uint8) * 255).save(buf, "PNG")
    return buf.getvalue()


def _ico(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "ICO")
    return buf.getvalue()


def test_oip_rest_door_rejects_30_bad_requests(server):
    infer = f"{server.url}/v2/models/mnist-cnn/infer"
    pids = server.worker_pids()
    raw = GOOD.tobytes()
    bin_input = {"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}

    def post_json(body, **kw):
        return httpx.post(infer, content=body if isinstance(body, bytes) else json.dumps(body),
                          headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)

    def post_binary(header, payload, headers=None):
        body, h = binary_request(header, payload)
        return httpx.post(infer, content=body, headers={**h, **(headers or {})})

    cases = [
        ("unknown model", lambda: httpx.post(f"{server.url}/v2/models/nope/infer", json=infer_json([tensor()]))),
        ("unknown version", lambda: httpx.post(f"{server.url}/v2/models/mnist-cnn/versions/99/infer",
                                               json=infer_json([tensor()]))),
        ("wrong input name", lambda: post_json(infer_json([tensor(name="pixels")]))),
        ("FP32 datatype", lambda: post_json(infer_json([tensor(datatype="FP32")]))),
        ("INT64 datatype", lambda: post_json(infer_json([tensor(datatype="INT64")]))),
        ("wrong shape", lambda: post_json(infer_json([tensor(shape=(1, 28, 27))]))),
        ("wrong rank", lambda: post_json(infer_json([tensor(shape=(28, 28))]))),
        ("negative dims", lambda: post_json(infer_json([tensor(shape=(-1, 28, 28), data=[0] * 784)]))),
        ("shape not a list", lambda: post_json(infer_json([{**tensor(), "shape": "1x28x28"}]))),
        ("data count != shape", lambda: post_json(infer_json([tensor(data=[0] * 700)]))),
        ("binary bytes != shape", lambda: post_binary(infer_json([{**bin_input, "parameters": {
            "binary_data_size": 700}}]), raw[:700])),
        ("binary_data_size != tail", lambda: post_binary(infer_json([bin_input]), raw[:500])),
        ("header length not a number", lambda: post_binary(infer_json([bin_input]), raw,
                                                           {"Inference-Header-Content-Length": "ten"})),
        ("header length past the body", lambda: post_binary(infer_json([bin_input]), raw,
                                                            {"Inference-Header-Content-Length": "999999"})),
        ("malformed binary header", lambda: httpx.post(infer, content=b"{bad json" + raw, headers={
            "Inference-Header-Content-Length": "9", "Content-Type": "application/octet-stream"})),
        ("malformed JSON", lambda: post_json(b'{"inputs": [')),
        ("JSON not an object", lambda: post_json([1, 2, 3])),
        ("inputs missing", lambda: post_json({"outputs": []})),
        ("inputs empty", lambda: post_json(infer_json([]))),
        ("two inputs", lambda: post_json(infer_json([tensor(), tensor()]))),
        ("empty batch", lambda: post_json(infer_json([tensor(shape=(0, 28, 28), data=[])]))),
        ("batch over the limit", lambda: post_binary(infer_json([{**bin_input, "shape": [MAX_IMAGES + 1, 28, 28],
                                                                  "parameters": {"binary_data_size": 784 * (
                                                                      MAX_IMAGES + 1)}}]),
                                                     raw * (MAX_IMAGES + 1))),
        ("NaN", lambda: post_json(b'{"inputs":[{"name":"images","shape":[1,1,1],"datatype":"UINT8","data":[NaN]}]}')),
        ("infinity", lambda: post_json(
            b'{"inputs":[{"name":"images","shape":[1,28,28],"datatype":"UINT8","data":[Infinity]}]}')),
        ("value over 255", lambda: post_json(infer_json([tensor(data=[300] * 784)]))),
        ("fractions", lambda: post_json(infer_json([tensor(data=[0.5] * 784)]))),
        ("strings", lambda: post_json(infer_json([tensor(data=["x"] * 784)]))),
        ("unknown output", lambda: post_json(infer_json([tensor()], outputs=[{"name": "embeddings"}]))),
        ("outputs not a list", lambda: post_json(infer_json([tensor()], outputs="probs"))),
        ("request parameters not an object", lambda: post_json(infer_json([tensor()], parameters=[1]))),
        ("output parameters not an object", lambda: post_json(infer_json([tensor()], outputs=[
            {"name": "probs", "parameters": 5}]))),
        ("timeout negative", lambda: post_json(infer_json([tensor()], parameters={"timeout": -5}))),
        ("timeout a string", lambda: post_json(infer_json([tensor()], parameters={"timeout": "100"}))),
        ("data and binary_data_size", lambda: post_binary(infer_json([{**bin_input, "data": [0] * 784}]), raw)),
        ("id not a string", lambda: post_json(infer_json([tensor()], id=123))),
        ("booleans as pixels", lambda: post_json(infer_json([tensor(data=[True] * 784)]))),
        ("a boolean among the numbers", lambda: post_json(infer_json([tensor(data=[0] * 783 + [True])]))),
        ("an image file", lambda: httpx.post(infer, content=png(GOOD[0]), headers={"content-type": "image/png"})),
        ("body over the size limit", lambda: post_binary(infer_json([bin_input]), b"\0" * (MAX_BYTES + 1))),
        ("binary tail without binary_data_size", lambda: post_binary(infer_json([tensor()]), raw)),
        ("no data", lambda: post_json(infer_json([{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8"}]))),
        ("GET on infer", lambda: httpx.get(infer)),
        ("metadata of unknown model", lambda: httpx.get(f"{server.url}/v2/models/nope")),
        ("config of unknown model", lambda: httpx.get(f"{server.url}/v2/models/nope/config")),
    ]
    assert len(cases) >= 30
    for what, call in cases:
        response = call()
        if what == "GET on infer":  # Starlette's own 405 carries a plain-text reason
            assert response.status_code == 405
            continue
        assert_client_error(response, what)
    r = post_binary(infer_json([bin_input], outputs=[{"name": "probs", "parameters": {"binary_data": True}}]), raw)
    assert r.status_code == 200
    n = int(r.headers["Inference-Header-Content-Length"])
    assert json.loads(r.content[:n])["outputs"][0]["parameters"]["binary_data_size"] == 40
    assert np.frombuffer(r.content[n:], "<f4").sum() == pytest.approx(1, abs=1e-5)
    assert server.worker_pids() == pids


def test_grpc_door_rejects_30_bad_requests(server):
    channel = grpc.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    pids = server.worker_pids()

    def infer_request(model="mnist-cnn", version="", name="images", datatype="UINT8", shape=(1, 28, 28),
                      raw=None, contents=None, outputs=(), n_inputs=1, n_raw=1) -> pb.ModelInferRequest:
        inp = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))
        if contents is not None:
            inp.contents.CopyFrom(contents)
        req = pb.ModelInferRequest(model_name=model, model_version=version, inputs=[inp] * n_inputs,
                                   outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs])
        if raw is None and contents is None:
            raw = GOOD.tobytes()
        if raw is not None:
            req.raw_input_contents.extend([raw] * n_raw)
        return req

    big = MAX_IMAGES + 1
    cases = [
        ("unknown model", lambda: stub.ModelInfer(infer_request(model="nope"))),
        ("empty model name", lambda: stub.ModelInfer(infer_request(model=""))),
        ("unknown version", lambda: stub.ModelInfer(infer_request(version="99"))),
        ("non-integer version", lambda: stub.ModelInfer(infer_request(version="v1"))),
        ("wrong input name", lambda: stub.ModelInfer(infer_request(name="pixels"))),
        ("FP32 datatype", lambda: stub.ModelInfer(infer_request(datatype="FP32", raw=b"\0" * 784 * 4))),
        ("INT8 datatype", lambda: stub.ModelInfer(infer_request(datatype="INT8"))),
        ("empty datatype", lambda: stub.ModelInfer(infer_request(datatype=""))),
        ("wrong shape", lambda: stub.ModelInfer(infer_request(shape=(1, 28, 27), raw=b"\0" * 756))),
        ("wrong rank", lambda: stub.ModelInfer(infer_request(shape=(784,)))),
        ("RGB shape for grey model", lambda: stub.ModelInfer(infer_request(shape=(1, 28, 28, 3), raw=b"\0" * 2352))),
        ("2D shape for 3D model", lambda: stub.ModelInfer(infer_request(model="organmnist3d-tiny"))),
        ("raw bytes != shape", lambda: stub.ModelInfer(infer_request(raw=b"\0" * 783))),
        ("raw bytes too many", lambda: stub.ModelInfer(infer_request(raw=b"\0" * 785))),
        ("huge declared shape", lambda: stub.ModelInfer(infer_request(shape=(1, 2**40, 28)))),
        ("negative dims", lambda: stub.ModelInfer(infer_request(shape=(-1, 28, 28)))),
        ("no inputs", lambda: stub.ModelInfer(infer_request(n_inputs=0))),
        ("two inputs", lambda: stub.ModelInfer(infer_request(n_inputs=2, n_raw=2))),
        ("two raw contents", lambda: stub.ModelInfer(infer_request(n_raw=2))),
        ("no data", lambda: stub.ModelInfer(infer_request(raw=b"", contents=pb.InferTensorContents()))),
        ("contents of the wrong type", lambda: stub.ModelInfer(infer_request(
            contents=pb.InferTensorContents(fp32_contents=[0.0] * 784)))),
        ("typed contents over 255", lambda: stub.ModelInfer(infer_request(
            contents=pb.InferTensorContents(uint_contents=[256] * 784)))),
        ("typed contents count != shape", lambda: stub.ModelInfer(infer_request(
            contents=pb.InferTensorContents(uint_contents=[0] * 10)))),
        ("empty batch", lambda: stub.ModelInfer(infer_request(shape=(0, 28, 28), raw=b""))),
        ("batch over the limit", lambda: stub.ModelInfer(infer_request(shape=(big, 28, 28), raw=b"\0" * 784 * big))),
        ("unknown output", lambda: stub.ModelInfer(infer_request(outputs=("logits_2",)))),
        ("message over the size limit", lambda: stub.ModelInfer(infer_request(raw=b"\0" * (MAX_BYTES + 1)))),
        ("metadata of unknown model", lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))),
        ("metadata of unknown version", lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist-cnn",
                                                                                           version="42"))),
        ("config of unknown model", lambda: stub.ModelConfig(pb.ModelConfigRequest(name="nope"))),
        ("config of unknown version", lambda: stub.ModelConfig(pb.ModelConfigRequest(name="mnist-cnn",
                                                                                     version="abc"))),
    ]
    assert len(cases) >= 30
    client_codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
    for what, call in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() in client_codes, f"{what}: {info.value.code()} {info.value.details()}"
        assert len(info.value.details() or "") > 10, f"{what}: no message"
    reply = stub.ModelInfer(infer_request())
    probs = np.frombuffer(reply.raw_output_contents[0], "<f4")
    assert reply.model_name == "mnist-cnn" and probs.shape == (10,) and probs.sum() == pytest.approx(1, abs=1e-5)
    assert server.worker_pids() == pids
    channel.close()


def test_mnist_gz_is_not_an_upload_either(server):
    body = gzip.compress(b"\0" * 100)
    r = httpx.post(f"{server.url}/classify", files=[("images", ("x.gz", body, "application/gzip"))],
                   data={"model": "mnist-cnn"})
    assert_client_error(r, "gzip upload")


def test_error_answers_to_http_1_0_carry_a_length_not_chunks(server):
    # an outside probe: a 404 or 405 to an HTTP/1.0 request came chunked (RFC 9112 6.1: a server must not send
    # Transfer-Encoding to HTTP/1.0), which an HTTP/1.0 client reads as part of the JSON
    for request in (b"GET /nope HTTP/1.0\r\n\r\n", b"DELETE /predict HTTP/1.0\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as client:
            client.sendall(request)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"404", b"405") and b"transfer-encoding" not in head.lower(), head
        assert json.loads(body)["error"], body


def test_headers_trickled_slower_than_the_header_timeout_get_408_and_a_closed_connection(server):
    """A slowloris client (header bytes now and then, never the blank line) is cut off at the header timeout,
    while a client that keeps the connection idle between requests is not."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as slow:
        slow.sendall(b"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        deadline = started + HEADER_TIMEOUT_S + 5
        while time.monotonic() < deadline:
            slow.sendall(b"X-Slow: 1\r\n")  # uvicorn's keep-alive timer restarts on every byte; this one does not
            try:
                slow.settimeout(0.3)
                chunk = slow.recv(4096)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert HEADER_TIMEOUT_S - 0.2 < elapsed < HEADER_TIMEOUT_S + 3
    with httpx.Client() as client:  # idle past the header timeout between requests: still served
        assert client.get(f"{server.url}/v2/health/live").status_code == 200
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        assert client.get(f"{server.url}/v2/health/live").status_code == 200


def test_a_new_connection_idle_past_the_header_timeout_is_still_served(server):
    """Pools and load balancers open connections ahead of use: one that has sent nothing yet is idle, not slow, and
    its first request (sent after the header timeout) is answered, not met by a 408 written while it waited."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as early:
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        early.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = early.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize("path", ["/v2/models/mnist-cnn/infer", "/classify", "/predict"])
def test_a_body_that_stops_arriving_gets_408_and_a_closed_connection(server, path):
    """A stalled upload held its slot of CNNSERVE_MAX_CONCURRENCY until the request timeout (60 s), then got 504."""
    started = time.monotonic()
    content_type = "multipart/form-data; boundary=b" if path == "/classify" else "application/json"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=HEADER_TIMEOUT_S + 5) as stalled:
        stalled.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                        "Content-Length: 1000\r\n\r\n".encode() + b'--b\r\nContent-Disposition: form-data')
        answer = stalled.recv(65536)
        assert stalled.recv(1) == b""  # closed
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert "stopped arriving" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert HEADER_TIMEOUT_S - 0.2 < elapsed < HEADER_TIMEOUT_S + 3


def test_a_slow_body_that_keeps_coming_is_answered(server):
    body = json.dumps(infer_json([{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                   "data": GOOD.ravel().tolist()}])).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as slow:
        slow.sendall(f"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        pieces = 4
        for i in range(pieces):  # the whole body takes longer than the timeout, no gap does
            time.sleep(HEADER_TIMEOUT_S * 0.6)
            slow.sendall(body[i * len(body) // pieces:(i + 1) * len(body) // pieces])
        answer = slow.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_request_headers_over_the_limit_get_431_and_a_closed_connection(server):
    """httptools buffers headers of any size: a 64 MB header was read whole (worker +115 MB) and answered."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as big:
        big.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        answer = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(64):  # 1 MiB in all, or less once the server has answered and closed
                big.sendall(b"a" * 16384)
        with contextlib.suppress(ConnectionResetError):
            answer = big.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert "CNNSERVE_MAX_HEADER_BYTES" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    fine = httpx.get(f"{server.url}/v2/health/live", headers={"X-Big": "a" * 30000})  # under the limit
    assert fine.status_code == 200


def test_a_large_body_pipelined_with_the_next_request_is_not_counted_as_its_headers(tmp_path):
    """The header-size limit counts a request's head only: a 100 KB body and the next request arriving in one write
    are two answered requests, not a 431 after the first (a limit under the size of the read that carries both, the
    next one's head unfinished)."""
    srv = start_server(EXPORTS, tmp_path / "server.log", workers=1, max_header_bytes=16384, poll_interval_s=0)
    body = json.dumps(infer_json([{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                   "data": GOOD.ravel().tolist()}])).encode() + b" " * 100_000
    first = (f"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as client:
            client.sendall(first + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # the next head, unfinished
            time.sleep(0.3)
            client.sendall(b"\r\n")
            answers = b""
            while answers.count(b"HTTP/1.1 ") < 2:
                chunk = client.recv(65536)
                if not chunk:
                    break
                answers += chunk
    finally:
        srv.stop()
    assert re.findall(rb"HTTP/1\.1 (\d+)", answers) == [b"200"] * 2, answers[:600]


def test_a_client_gone_halfway_through_its_body_is_answered_nothing_and_logged_without_a_traceback(server):
    """The OIP infer endpoint reads the body itself: a client that closes before its declared body is all in gets
    no answer (there is no one to answer), the worker logs no exception for it, and serves the next request."""
    images = {"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}
    head, headers = binary_request(infer_json([images]), GOOD.tobytes())
    fields = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "x", "Content-Length": len(head), **headers}.items())
    half_sent = f"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\n{fields}\r\n".encode() + head[:len(head) // 2]
    logged = server.log.stat().st_size
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as gone:
            gone.sendall(half_sent)
            time.sleep(0.1)
    answer = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", content=head, headers=headers, timeout=30)
    assert answer.status_code == 200
    time.sleep(0.5)
    with open(server.log, "rb") as log:
        log.seek(logged)
        new = log.read().decode(errors="replace")
    assert "Traceback" not in new and "Exception in ASGI application" not in new, new[-3000:]


def test_bytes_that_are_not_http_get_a_400_and_one_log_line(server):
    # Content-Length and chunked together (a request-smuggling shape): uvicorn's parser refuses it; BentoML's
    # logging config wrote its warning twice (the uvicorn logger's handler, then the root's)
    logged = server.log.stat().st_size
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply.lower()

    def written() -> str:
        with open(server.log, "rb") as log:
            log.seek(logged)
            return log.read().decode(errors="replace")

    deadline = time.monotonic() + 10
    while "Invalid HTTP request received" not in written() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a second copy would follow at once
    assert written().count("Invalid HTTP request received") == 1, written()[-2000:]


def test_the_messages_say_what_to_fix(server):
    """A binary body without its header length names the header; a version that is not a number is the client's
    mistake (400 / INVALID_ARGUMENT), not an unknown model (404)."""
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", content=header + bytes(range(256)) * 3 + bytes(16),
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400 and "Inference-Header-Content-Length header" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/versions/abc/infer", json=infer_json([tensor()]))
    assert r.status_code == 400 and "positive integer" in r.json()["error"], r.text
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_address))
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist-cnn", version="abc"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unreadable_multipart_bodies_and_too_many_files_are_4xx_not_500(server):
    # Starlette's own 400s for these (no boundary, a part header without a colon, over 1,000 fields or files) left
    # BentoML's wrapper as 500s with a traceback; its 1,000-file limit also sat below the service's image limit
    classify = f"{server.url}/classify"
    part = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nmnist-cnn\r\n--b--\r\n'
    headless = b"--b\r\nthis line has no colon\r\n\r\nmnist-cnn\r\n--b--\r\n"
    unreadable = [
        ("no boundary", httpx.post(classify, content=part, headers={"Content-Type": "multipart/form-data"})),
        ("part header without a colon", httpx.post(classify, content=headless,
                                                   headers={"Content-Type": "multipart/form-data; boundary=b"})),
        ("1,001 plain fields", httpx.post(classify, files=[("images", ("a.png", _png_digit(), "image/png"))],
                                          data={"model": "mnist-cnn", **{f"f{i}": "x" for i in range(1001)}})),
    ]
    for what, response in unreadable:
        assert_client_error(response, what)
        assert response.status_code == 400 and "not a readable form" in response.json()["error"], response.text
    for count in (MAX_IMAGES + 1, 1001):  # the API's own count, and one the form parser refuses on its own
        response = httpx.post(classify, files=[("images", (f"{i}.png", _png_digit(), "image/png"))
                                               for i in range(count)], data={"model": "mnist-cnn"})
        assert response.status_code == 413 and f"{MAX_IMAGES}" in response.json()["error"], response.text
    r = httpx.post(classify, files=[("images", ("a.png", _png_digit(), "image/png"))], data={"model": "mnist-cnn"})
    assert r.status_code == 200


def test_a_multipart_body_cut_before_its_closing_boundary_is_refused_not_answered_in_part(server):
    # an outside probe: the form parser drops a part cut short without a word, so such an upload was answered for
    # the files before the cut, or as "images: Field required"
    classify, png = f"{server.url}/classify", _png_digit()

    def part(name: str, body: bytes, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--Cut\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + body + b"\r\n"

    whole = part("model", b"mnist-cnn") + part("images", png, "a.png") + part("images", png, "b.png") + b"--Cut--"
    headers = {"content-type": "multipart/form-data; boundary=Cut"}
    r = httpx.post(classify, content=whole + b"\r\nan epilogue, which RFC 2046 allows\r\n", headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    for cut in (whole[:-len(b"--Cut--")], whole[:-len(png) // 2 - len(b'\r\n--Cut--')], whole[:-2]):
        r = httpx.post(classify, content=cut, headers=headers)
        assert r.status_code == 400 and "ends before its closing boundary (--Cut--)" in r.json()["error"], r.text
    assert httpx.post(classify, content=b"--Cut--\r\n", headers=headers).json()["error"].startswith(
        "invalid request: images: ")  # a whole form with no parts: the fields' own message


def test_version_zero_or_negative_duplicate_outputs_and_fields_twice_are_refused_on_every_door(server):
    # an outside probe: version 0 meant "latest" on /predict and /classify and "not found" on /v2 and gRPC; an
    # output asked for twice was merged (the last won); a form field given twice was taken from its last value
    digit, url = GOOD[0], server.url
    for version in (0, "0", -1):
        r = httpx.post(f"{url}/predict", json={"instances": digit.tolist(), "model": "mnist-cnn", "version": version})
        assert r.status_code == 400 and "positive integer" in r.json()["error"], (version, r.text)
    r = httpx.post(f"{url}/classify", files=[("images", ("a.png", png(digit), "image/png"))],
                   data={"model": "mnist-cnn", "version": "0"})
    assert r.status_code == 400 and "positive integer" in r.json()["error"], r.text
    r = httpx.post(f"{url}/v2/models/mnist-cnn/versions/0/infer", json=infer_json([tensor(data=digit.tolist())]))
    assert r.status_code == 400 and "positive integer" in r.json()["error"], r.text
    twice = [{"name": "probs"}, {"name": "probs", "parameters": {"classification": 2}}]
    r = httpx.post(f"{url}/v2/models/mnist-cnn/infer", json=infer_json([tensor(data=digit.tolist())], outputs=twice))
    assert r.status_code == 400 and "requested twice" in r.json()["error"], r.text
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_address))
    image = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 28, 28])
    for version, outputs in (("0", []), ("-1", []), ("", ["probs", "probs"])):
        request = pb.ModelInferRequest(model_name="mnist-cnn", model_version=version, inputs=[image],
                                       raw_input_contents=[digit.tobytes()],
                                       outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o)
                                                for o in outputs])
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (version, refused.value.details())
    r = httpx.post(f"{url}/classify", files=[("images", ("a.png", png(digit), "image/png"))],
                   data={"model": ["mnist-cnn", "pneumoniamnist-cnn"]})
    assert r.status_code == 400 and "'model' is given 2 times" in r.json()["error"], r.text


def test_json_nested_past_the_parsers_depth_is_a_400_on_every_route_not_a_500(server):
    # an outside probe: 1,025 levels of [ got a 500 (text/plain on /infer) and a RecursionError traceback in the log
    deep = b"[" * 5000 + b"]" * 5000
    inner = json.dumps(infer_json([tensor(data="DATA")])).replace('"DATA"', "[" * 1100 + "0" + "]" * 1100)
    for path, body in (("/v2/models/mnist-cnn/infer", deep), ("/v2/models/mnist-cnn/infer", inner.encode()),
                       ("/v2/repository/index", deep), ("/v2/repository/models/mnist-cnn/load", deep),
                       ("/v2/repository/models/mnist-cnn/unload", deep)):
        r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
        assert_client_error(r, "nested too deeply")
    # orjson reads up to 1,023 levels; Python walks and prints fewer: such values in an id, a shape, parameters
    nested = "[" * 1000 + "]" * 1000
    for field in ('"id": ' + nested, '"parameters": {"x": ' + nested + "}"):
        body = json.dumps(infer_json([tensor()])).replace('{"inputs"', "{" + field + ', "inputs"')
        r = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", content=body.encode(),
                       headers={"content-type": "application/json"})
        assert r.status_code < 500 and isinstance(r.json(), dict), (field[:20], r.status_code, r.text[:200])
    body = json.dumps(infer_json([{**tensor(), "shape": "SHAPE"}])).replace('"SHAPE"', nested)
    r = httpx.post(f"{server.url}/v2/models/mnist-cnn/infer", content=body.encode(),
                   headers={"content-type": "application/json"})
    assert_client_error(r, "a shape nested 1,000 deep")
    r = httpx.post(f"{server.url}/v2/repository/models/mnist-cnn/unload",
                   content=b'{"parameters": {"x": ' + nested.encode() + b"}}")
    assert_client_error(r, "an unload parameter nested 1,000 deep")
    assert httpx.get(f"{server.url}/v2/models/mnist-cnn/ready").status_code == 200  # the unloads were refused
    time.sleep(0.2)
    assert "RecursionError" not in server.log.read_text() and "request failed" not in server.log.read_text()


def test_numbers_past_4300_digits_and_long_names_get_client_errors_on_every_door(server):
    # an outside probe: int() and str() refuse integers of over 4,300 digits, so a 5,000-digit version, or such a
    # number anywhere in a JSON body or a form value, was a 500 (gRPC INTERNAL); a 16 KB model name in a gRPC error
    # overflowed the client's limit on trailers (RESOURCE_EXHAUSTED "received metadata size exceeds hard limit")
    digit, url, long = GOOD[0], server.url, "9" * 5000
    for path in (f"/v2/models/mnist-cnn/versions/{long}", f"/v2/models/mnist-cnn/versions/{long}/ready"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 404 and "no version of 5000 digits" in r.json()["error"], (path[:40], r.text)
    r = httpx.post(f"{url}/v2/models/mnist-cnn/versions/{long}/infer", json=infer_json([tensor(data=digit.tolist())]))
    assert r.status_code == 404 and "no version of 5000 digits" in r.json()["error"], r.text
    r = httpx.post(f"{url}/predict", json={"instances": digit.tolist(), "model": "mnist-cnn", "version": long})
    assert r.status_code == 404 and "no version of 5000 digits" in r.json()["error"], r.text
    for field in ("version", "top_k"):
        r = httpx.post(f"{url}/classify", files=[("images", ("a.png", png(digit), "image/png"))],
                       data={"model": "mnist-cnn", field: long})
        assert_client_error(r, field)
        assert r.json()["error"] == f"multipart field {field!r} holds a number too long to read", r.text
    body = json.dumps(infer_json([tensor(data=digit.tolist())], parameters={"timeout": "T"}))
    for path, text in (("/v2/models/mnist-cnn/infer", body.replace('"T"', long)),
                       ("/v2/models/mnist-cnn/infer", body.replace("[0, ", f"[{long}, ", 1)),
                       ("/v2/repository/index", '{"ready": ' + long + '}')):
        r = httpx.post(f"{url}{path}", content=text.encode(), headers={"content-type": "application/json"})
        assert_client_error(r, path)
        assert "a JSON integer of 5000 digits: at most 20 are read" in r.json()["error"], r.text
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_address))
    image = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 28, 28])
    for name, version, message in (("mnist-cnn", long, "no version of 5000 digits"),
                                   ("m" * 20_000, "", "characters in all)")):
        request = pb.ModelInferRequest(model_name=name, model_version=version, inputs=[image],
                                       raw_input_contents=[digit.tobytes()])
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()[:200]
        assert message in refused.value.details() and len(refused.value.details()) < 2100, \
            refused.value.details()[-200:]
    time.sleep(0.2)
    assert "Traceback" not in server.log.read_text()


def test_unload_reads_its_body_as_load_does(server):
    # an outside probe: unload ignored its body and unloaded the model on '{', 'xyz' or unknown parameters
    url = f"{server.url}/v2/repository/models/mnist-cnn/unload"
    for body in (b"{", b"xyz", b"[1]", b'{"parameters": 5}', b'{"parameters": {"force": true}}',
                 b'{"parameters": {"unload_dependents": "yes"}}'):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), (body, r.text)
    assert httpx.get(f"{server.url}/v2/models/mnist-cnn/ready").status_code == 200


def test_true_or_false_is_not_a_version_nor_a_count(server):
    # an outside probe: version true served version 1 (pydantic's lax mode reads true as 1), top_k true listed one
    digit = GOOD[0]
    for field, value in (("version", True), ("version", False), ("top_k", True)):
        r = httpx.post(f"{server.url}/predict", json={"instances": digit.tolist(), "model": "mnist-cnn", field: value})
        assert r.status_code == 400 and "true / false" in r.text, (field, value, r.text)
    r = httpx.post(f"{server.url}/classify", files=[("images", ("a.png", png(digit), "image/png"))],
                   data={"model": "mnist-cnn", "version": "true"})
    assert r.status_code == 400, r.text


def test_an_image_sent_to_predict_is_pointed_at_classify(server):
    # an outside probe: a PNG body to /predict got "Invalid JSON", a multipart file "this API takes no files",
    # where the OIP route says where images go
    picture = png(GOOD[0])
    r = httpx.post(f"{server.url}/predict", content=picture, headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and "/classify" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/predict", files=[("image", ("a.png", picture, "image/png"))])
    assert r.status_code == 400 and "/classify" in r.json()["error"], r.text


def _blank_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG")  # a few kB that decode to side² pixels
    return buffer.getvalue()


def test_misspelt_fields_unnamed_uploads_and_costly_pixel_totals_are_refused_clearly(server):
    # an outside probe: top_k misspelt was ignored (top 1 answered), an upload without a name was named after the
    # server's temporary file, and 1,024 blank 4096x4096 PNGs (16 MB) kept a worker decoding for 40 s, then a 504
    classify, predict = f"{server.url}/classify", f"{server.url}/predict"
    digit = [("images", ("a.png", _png_digit(), "image/png"))]
    r = httpx.post(classify, files=digit, data={"model": "mnist-cnn", "topk": "3"})
    assert r.status_code == 400 and "unknown field 'topk'" in r.json()["error"], r.text
    r = httpx.post(predict, json={"instances": np.zeros((28, 28), int).tolist(), "model": "mnist-cnn", "topk": 3})
    assert r.status_code == 400 and "unknown field 'topk'" in r.json()["error"], r.text
    r = httpx.post(classify, files=digit, data={"model": "mnist-cnn", "top_k": "many"})
    assert r.status_code == 400 and r.json()["error"].startswith("invalid request: top_k: "), r.text
    png = _png_digit()
    for second_part, message in (  # a browser's file input with no file chosen; curl -F images=
            (b'Content-Disposition: form-data; name="images"; filename=""\r\nContent-Type: '
             b"application/octet-stream\r\n\r\n", "upload '#2 (no name)' is empty"),
            (b'Content-Disposition: form-data; name="images"\r\n\r\n',
             "multipart field 'images' has no file in it: choose a file to upload")):
        form = (b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\nContent-Type: '
                b"image/png\r\n\r\n" + png + b"\r\n--b\r\n" + second_part + b"\r\n--b\r\nContent-Disposition: "
                b'form-data; name="model"\r\n\r\nmnist-cnn\r\n--b--\r\n')
        r = httpx.post(classify, content=form, headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 400 and r.json()["error"] == message, r.text
    blank = _blank_png(4096)  # 16 Mpx, at the per-image limit: five are over the request's 64 Mpx
    r = httpx.post(classify, files=[("images", (f"{i}.png", blank, "image/png")) for i in range(5)],
                   data={"model": "mnist-cnn"}, timeout=30)
    assert r.status_code == 413 and "CNNSERVE_MAX_REQUEST_PIXELS" in r.json()["error"], r.text
    assert httpx.post(classify, files=digit, data={"model": "mnist-cnn", "top_k": "3"}).status_code == 200


def test_classify_reads_its_form_whatever_the_case_of_its_media_type_and_refuses_other_bodies(server):
    # an outside probe: MULTIPART/FORM-DATA (media types are case-insensitive) and a PNG sent as the body were both
    # read as JSON ("Invalid JSON")
    classify, picture = f"{server.url}/classify", _png_digit()
    form = (b'--Zz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + picture
            + b'\r\n--Zz\r\nContent-Disposition: form-data; name="model"\r\n\r\nmnist-cnn\r\n--Zz--\r\n')
    r = httpx.post(classify, content=form, headers={"content-type": "MULTIPART/Form-Data; boundary=Zz"})
    assert r.status_code == 200 and r.json()["model"] == "mnist-cnn", r.text
    def refused_on_classify() -> float:
        wanted = 'cnnserve_requests_total{door="classify",model="",outcome="invalid"}'
        lines = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line.startswith(wanted)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    before = refused_on_classify()
    for content_type in ("image/png", "application/json", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        r = httpx.post(classify, content=picture, headers=headers)
        assert r.status_code == 415 and "multipart/form-data in its 'images' field" in r.json()["error"], r.text
        assert r.headers["connection"] == "close"  # its body is not read: the connection ends
    assert refused_on_classify() == before + 4  # counted as the app's own refusals are


def test_a_predict_shape_error_quotes_the_shape_as_sent(server):
    # an outside probe: [[0, 0, 0]] was quoted as [1, 1, 3], the batch axis the service had added
    predict = f"{server.url}/predict"
    for instances, sent in (([[0, 0, 0]], [1, 3]), (np.zeros((4, 28, 27), int).tolist(), [4, 28, 27])):
        r = httpx.post(predict, json={"instances": instances, "model": "mnist-cnn"})
        assert r.status_code == 400 and r.json()["error"].startswith(f"instances have shape {sent}; model mnist-cnn "
                                                                     "takes one image of shape [28, 28]"), r.text
