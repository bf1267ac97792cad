"""The real service on 127.0.0.1, called with real clients: tritonclient (HTTP binary and JSON, gRPC),
bentoml.SyncHTTPClient and httpx multipart uploads."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import shutil
import time
from pathlib import Path

import bentoml
import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from serving.model_card import read_card, write_json_atomic
from serving.worker_stats import PUBLISH_INTERVAL_S
from tests.conftest import EXPORTS, SHARED_DATA
from tests.server import png, start_server


def latest(name: str) -> Path:
    return max((EXPORTS / name).iterdir(), key=lambda p: int(p.name))


def mnist_test_images(n: int, fixture_data: Path) -> np.ndarray:
    root = SHARED_DATA if (SHARED_DATA / "MNIST").exists() else fixture_data
    with gzip.open(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n].copy()


def pneumonia_test_images(n: int, fixture_data: Path) -> np.ndarray:
    root = SHARED_DATA if (SHARED_DATA / "medmnist").exists() else fixture_data
    return np.load(root / "medmnist" / "pneumoniamnist.npz")["test_images"][:n]


def reference_probs(model: str, images: np.ndarray, repo: Path) -> np.ndarray:
    path = max((repo / model).iterdir(), key=lambda p: int(p.name)) / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"images": images})[0]


# --- every door returns the same probabilities as onnxruntime in-process --------------------------------

def test_shipped_models_are_ready_with_cards(server):
    r = httpx.get(f"{server.url}/models")
    names = {m["name"] for m in r.json()["models"]}
    assert {"mnist-cnn", "pneumoniamnist-cnn", "pneumoniamnist-transfer"} <= names
    assert httpx.get(f"{server.url}/readyz").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.head(f"{server.url}/livez").status_code == 200
    assert "binary_tensor_data" in httpx.get(f"{server.url}/v2").json()["extensions"]


@pytest.mark.parametrize("model,loader", [("mnist-cnn", mnist_test_images),
                                          ("pneumoniamnist-cnn", pneumonia_test_images),
                                          ("pneumoniamnist-transfer", pneumonia_test_images)])
def test_all_doors_match_onnxruntime_in_process(server, repo, fixture_data, model, loader):
    images = loader(8, fixture_data)
    expected = reference_probs(model, images, repo)
    labels = read_card(latest(model) / "model.json").labels

    client = httpclient.InferenceServerClient(server.http_address)
    for binary in (True, False):
        inp = httpclient.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images, binary_data=binary)
        out = httpclient.InferRequestedOutput("probs", binary_data=binary)
        got = client.infer(model, [inp], outputs=[out]).as_numpy("probs")
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"HTTP binary={binary}")

    gclient = grpcclient.InferenceServerClient(server.grpc_address)
    inp = grpcclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    np.testing.assert_allclose(gclient.infer(model, [inp]).as_numpy("probs"), expected, atol=1e-6)

    with bentoml.SyncHTTPClient(server.url, timeout=30) as bento:
        result = bento.predict(instances=images.tolist(), model=model, top_k=2)
    got = np.array([p["probs"] for p in result["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [p["label"] for p in result["predictions"]] == [labels[i] for i in expected.argmax(1)]

    files = [("images", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(images)]
    r = httpx.post(f"{server.url}/classify", files=files, data={"model": model, "top_k": "1"}, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    np.testing.assert_allclose([res["top_k"][0]["prob"] for res in results], expected.max(1), atol=1e-6)
    assert [res["label"] for res in results] == [labels[i] for i in expected.argmax(1)]
    assert all(res["converted"] == [] for res in results)


def test_classify_converts_size_and_colour_and_says_so(server, fixture_data):
    image = mnist_test_images(1, fixture_data)[0]
    files = [("images", ("big.png", png(image, size=(56, 56), mode="RGB"), "image/png"))]
    r = httpx.post(f"{server.url}/classify", files=files, data={"model": "mnist-cnn", "top_k": "3"})
    result = r.json()["results"][0]
    assert r.status_code == 200 and len(result["top_k"]) == 3
    assert len(result["converted"]) == 2 and result["converted"][0] == "converted RGB to L"
    assert result["converted"][1].startswith("framed: its strokes")  # mnist-cnn's digits sit on black
    assert "background at 28x28" in result["converted"][1]
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, "JPEG", quality=95)
    bmp = io.BytesIO()
    Image.fromarray(image).save(bmp, "BMP")
    tiff = io.BytesIO()
    Image.fromarray(image).save(tiff, "TIFF")
    files = [("images", (n, b.getvalue(), "application/octet-stream")) for n, b in
             (("a.jpg", jpeg), ("b.bmp", bmp), ("c.tiff", tiff))]
    r = httpx.post(f"{server.url}/classify", files=files, data={"model": "mnist-cnn"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_3d_volumes_over_npy_upload_and_grpc(server, repo):
    volume = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28, 28), dtype=np.uint8)
    expected = reference_probs("organmnist3d-tiny", volume, repo)
    buf = io.BytesIO()
    np.save(buf, volume[0])
    r = httpx.post(f"{server.url}/classify", files=[("images", ("v.npy", buf.getvalue(), "application/x-npy"))],
                   data={"model": "organmnist3d-tiny"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["top_k"][0]["prob"] == pytest.approx(float(expected[0].max()), abs=1e-6)
    gclient = grpcclient.InferenceServerClient(server.grpc_address)
    inp = grpcclient.InferInput("images", list(volume.shape), "UINT8")
    inp.set_data_from_numpy(volume)
    np.testing.assert_allclose(gclient.infer("organmnist3d-tiny", [inp]).as_numpy("probs"), expected, atol=1e-6)


def test_client_batches_over_the_limit_are_split_and_answered_whole(server, repo, fixture_data):
    images = np.concatenate([mnist_test_images(50, fixture_data)] * 3)  # 150 images, the card's batch is 64
    gclient = grpcclient.InferenceServerClient(server.grpc_address)  # one channel: one worker answers both
    time.sleep(3 * PUBLISH_INTERVAL_S)  # the other workers' counts of earlier tests are in the statistics by now
    before = gclient.get_inference_statistics("mnist-cnn", as_json=True)["model_stats"]
    inp = grpcclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    reply = gclient.infer("mnist-cnn", [inp])
    np.testing.assert_allclose(reply.as_numpy("probs"), reference_probs("mnist-cnn", images, repo), atol=1e-6)
    version = reply.get_response().model_version
    after = gclient.get_inference_statistics("mnist-cnn", version, as_json=True)["model_stats"][0]
    [old] = [s for s in before if s["version"] == version]
    chunks = int(after["inference_stats"]["compute_infer"]["count"]) - \
        int(old["inference_stats"].get("compute_infer", {}).get("count", 0))
    assert chunks == 3  # 64 + 64 + 22: the split ran, each chunk in a batch of its own or with others
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) <= 64  # no run was over the card's batch


def test_grpc_metadata_config_and_health(server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gclient = grpcclient.InferenceServerClient(server.grpc_address)
    assert gclient.is_server_live() and gclient.is_server_ready() and gclient.is_model_ready("mnist-cnn")
    assert not gclient.is_model_ready("nope") and not gclient.is_model_ready("mnist-cnn", "99")  # as Triton's
    with pytest.raises(InferenceServerException, match="'model' is required"):  # as ModelInfer / ModelMetadata
        gclient.is_model_ready("")
    config = gclient.get_model_config("mnist-cnn").config
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [28, 28]
    assert config.version_policy.WhichOneof("policy_choice") == "all"  # as the HTTP config has it: every version
    assert gclient.get_model_metadata("mnist-cnn").inputs[0].datatype == "UINT8"
    assert gclient.get_server_metadata().name == "cnnserve"
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_reflection_lets_a_client_without_the_protos_call_the_service(server):
    # what grpcurl does: list the services, fetch their descriptors, build the messages, call a method
    import grpc
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName("ModelReady")
        request = message_factory.GetMessageClass(method.input_type)(name="mnist-cnn")
        reply_type = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelReady",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=reply_type.FromString)
        assert call(request, timeout=10).ready is True


@pytest.mark.parametrize("enabled", [True, False])
def test_reflection_follows_its_setting(enabled):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from serving.oip_grpc import GrpcServer
    from serving.settings import Settings
    from tests.server import free_port

    class Ready:  # all GrpcServer asks of the data plane before any inference call
        def ready(self) -> bool:
            return True

    async def listed() -> list[str] | str:
        port = free_port()
        server = GrpcServer(Ready(), Settings(grpc_port=port, grpc_reflection=enabled))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                try:
                    reply = await call.read()
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                await call.done_writing()
                return [s.name for s in reply.list_services_response.service]
        finally:
            await server.stop(0)

    answer = asyncio.run(listed())
    assert ("inference.GRPCInferenceService" in answer) if enabled else answer == "UNIMPLEMENTED", answer


def test_http_config_for_perf_analyzer_and_versions(server):
    config = httpx.get(f"{server.url}/v2/models/mnist-cnn/config").json()
    assert config["max_batch_size"] == 64 and config["input"][0]["data_type"] == "TYPE_UINT8"
    assert "dynamic_batching" in config
    meta = httpx.get(f"{server.url}/v2/models/mnist-cnn/versions/1").json()
    assert meta["inputs"][0]["shape"] == [-1, 28, 28] and meta["outputs"][0]["shape"] == [-1, 10]
    assert httpx.get(f"{server.url}/v2/models/mnist-cnn/versions/1/ready").json()["ready"] is True


def test_metrics_count_requests(server, fixture_data):
    def count() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("cnnserve_requests_total{") and 'model="mnist-cnn"' in line
                   and 'door="predict"' in line and 'outcome="ok"' in line)

    before = count()
    for _ in range(3):
        httpx.post(f"{server.url}/predict", json={"instances": mnist_test_images(1, fixture_data).tolist(),
                                                  "model": "mnist-cnn"})
    assert count() == before + 3
    text = httpx.get(f"{server.url}/metrics").text
    assert "cnnserve_batch_size_bucket" in text and "cnnserve_queue_seconds_bucket" in text


def test_bentoml_request_metrics_are_labelled_by_route_not_by_path(server):
    # an outside probe: BentoML labelled its request metrics with the raw path, so every unknown path, model name
    # and version added series for good (2,000 of them took /metrics from 6.9 to 54.5 MB)
    for i in range(20):
        httpx.get(f"{server.url}/v2/models/no-such-model-{i}/ready")
        httpx.get(f"{server.url}/scanner/probe-{i}.php")
    assert httpx.get(f"{server.url}/v2/models/mnist-cnn/versions/1/ready").status_code == 200
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    endpoints = {sample.labels["endpoint"] for family in families if family.name.startswith("bentoml_service_request")
                 for sample in family.samples if "endpoint" in sample.labels}
    assert {"(no route)", "/v2/models/{model}/ready", "/v2/models/{model}/versions/{version}/ready"} <= endpoints
    assert not [e for e in endpoints if "no-such-model" in e or "probe-" in e or "mnist-cnn" in e], endpoints


def test_new_version_is_picked_up_without_restart_and_old_stays_addressable(server, repo, fixture_data):
    source = latest("mnist-cnn")
    target = repo / "mnist-cnn" / str(int(source.name) + 1)
    staging = repo / "mnist-cnn" / ".staging-test"
    shutil.copytree(repo / "mnist-cnn" / source.name, staging)
    card = json.loads((staging / "model.json").read_text())
    card["version"] = int(target.name)
    write_json_atomic(staging / "model.json", card)
    staging.rename(target)
    pids = server.worker_pids()
    client = httpclient.InferenceServerClient(server.http_address)
    images = mnist_test_images(2, fixture_data)
    inp = httpclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if client.infer("mnist-cnn", [inp]).get_response()["model_version"] == target.name:
            break
        time.sleep(0.3)
    else:
        pytest.fail("new version was not picked up")
    assert client.infer("mnist-cnn", [inp], model_version=source.name).get_response()["model_version"] == source.name
    assert server.worker_pids() == pids


def test_a_broken_model_is_not_ready_with_a_reason_and_the_others_serve(repo, tmp_path):
    broken_repo = tmp_path / "repo"
    shutil.copytree(repo / "mnist-cnn", broken_repo / "mnist-cnn")
    shutil.copytree(repo / "mnist-cnn" / "1", broken_repo / "broken" / "1")
    card = json.loads((broken_repo / "broken" / "1" / "model.json").read_text())
    card["name"], card["sha256"] = "broken", "0" * 64
    write_json_atomic(broken_repo / "broken" / "1" / "model.json", card)
    srv = start_server(broken_repo, tmp_path / "log", poll_interval_s=0)
    try:
        assert "sha256" in httpx.get(f"{srv.url}/v2/health/ready").json()["not_ready"]["broken/1"]
        assert "sha256" in httpx.get(f"{srv.url}/readyz").json()["not_ready"]["broken/1"]  # the probes' path too
        r = httpx.get(f"{srv.url}/v2/models/broken/ready")
        assert r.status_code == 503 and "sha256" in r.json()["error"]
        status = {s["name"]: s for s in httpx.get(f"{srv.url}/models").json()["status"]}
        assert status["broken"]["ready"] is False and "sha256" in status["broken"]["reason"]
        assert httpx.get(f"{srv.url}/v2/models/mnist-cnn/ready").json()["ready"] is True
    finally:
        srv.stop()


def test_readiness_is_false_until_a_model_is_loaded(tmp_path, repo):
    empty = tmp_path / "repo"
    empty.mkdir()
    srv = start_server(empty, tmp_path / "log", wait_ready=False, poll_interval_s=0.3)
    try:
        assert httpx.get(f"{srv.url}/readyz").status_code == 503
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 503
        shutil.copytree(repo / "mnist-cnn", empty / "mnist-cnn")
        deadline = time.monotonic() + 15
        while httpx.get(f"{srv.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "did not become ready"
            time.sleep(0.2)
    finally:
        srv.stop()


def test_http_connections_opened_together_spread_over_the_workers(server):
    """A pool of connections opened at once lands on whichever worker accepts first; the workers hand the extra
    ones back with Connection: close until each holds its share (serving/connections.py)."""
    workers = [psutil.Process(pid) for pid in server.worker_pids()]
    if len(workers) < 2:
        pytest.skip("one worker: nothing to spread")
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    body = header + bytes(784)
    request = (f"POST /v2/models/mnist-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
               f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    handed_back = 0

    class Client:
        async def connect(self) -> None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", server.http_port)

        async def infer(self) -> None:
            nonlocal handed_back
            self.writer.write(request)
            head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
            await self.reader.readexactly(int(head.split(b"content-length:")[1].split(b"\r\n")[0]))
            assert head.startswith(b"http/1.1 200"), head
            if b"connection: close" in head:
                handed_back += 1
                self.writer.close()
                await self.connect()

    clients = [Client() for _ in range(8)]

    def held() -> list[int]:
        """The clients' connections each worker holds (not other tests' keep-alive connections to this server)."""
        ports = {c.writer.get_extra_info("sockname")[1] for c in clients}
        return [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.http_port and c.raddr.port in ports
                    for c in w.net_connections("tcp")) for w in workers]

    async def main() -> list[int]:
        await asyncio.gather(*(c.connect() for c in clients))  # together: the first worker to wake takes them all
        deadline = time.monotonic() + 15  # a worker still loading its models accepts nothing yet
        for _ in range(5):  # some rounds first, whatever the spread at the start
            await asyncio.gather(*(c.infer() for c in clients))
        while (max(counts := held()) - min(counts) > 2 or sum(counts) != 8) and time.monotonic() < deadline:
            await asyncio.gather(*(c.infer() for c in clients))
            await asyncio.sleep(0.01)
        for c in clients:
            c.writer.close()
        return counts

    counts = asyncio.run(main())
    assert sum(counts) == 8 and max(counts) - min(counts) <= 2, \
        f"connections per worker: {counts} ({handed_back} handed back)"
