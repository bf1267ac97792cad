"""Open Inference Protocol gRPC (``inference.GRPCInferenceService``) plus ``grpc.health.v1.Health``.

Uses tritonclient's maintained generated stubs (Triton's superset of the OIP service, ModelConfig
included). Runs as a ``grpc.aio`` server on the service worker's event loop, so it shares the
worker's model repository and batchers; several workers share the port through SO_REUSEPORT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving import __version__
from serving.errors import InvalidInput, ServingError
from serving.inference import Inference
from serving.model_card import PROBS_NAME
from serving.oip import EXTENSIONS, SERVER_NAME, check_outputs, decode_input, model_config, model_metadata

log = logging.getLogger("cnnserve.grpc")


def _guard(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``ServingError`` into a gRPC status with its message."""

    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(exc.grpc_code, exc.message)

    wrapper.__name__ = method.__name__
    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, inference: Inference) -> None:
        self.inference = inference

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.inference.repository.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    @_guard
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.inference.model(request.name, request.version or None)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_guard
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = self.inference.model(request.name, request.version or None)
        meta = model_metadata(model, self.inference.repository.versions(model.name))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    @_guard
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        cfg = model_config(self.inference.model(request.name, request.version or None))
        from tritonclient.grpc import model_config_pb2 as mc

        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=cfg["name"], platform=cfg["platform"], backend=cfg["backend"], max_batch_size=cfg["max_batch_size"],
            input=[mc.ModelInput(name=i["name"], data_type=mc.TYPE_UINT8, dims=i["dims"]) for i in cfg["input"]],
            output=[mc.ModelOutput(name=o["name"], data_type=mc.TYPE_FP32, dims=o["dims"]) for o in cfg["output"]],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=cfg["dynamic_batching"]["max_queue_delay_microseconds"])))

    @_guard
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        model = self.inference.model(request.model_name, request.model_version or None)
        if len(request.inputs) != 1:
            raise InvalidInput(f"expected exactly one input tensor, 'images'; got {len(request.inputs)}")
        tensor = request.inputs[0]
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidInput("raw_input_contents must hold exactly one entry, for 'images'")
            images = decode_input(model, tensor.name, tensor.datatype, list(tensor.shape),
                                  raw=request.raw_input_contents[0])
        else:
            values = tensor.contents.uint_contents
            if not values:
                raise InvalidInput("input 'images' has no data: use raw_input_contents or contents.uint_contents")
            images = decode_input(model, tensor.name, tensor.datatype, list(tensor.shape), values=list(values))
        check_outputs([o.name for o in request.outputs])
        probs = await self.inference.probs(model, images, "oip-grpc")
        out = pb.ModelInferResponse.InferOutputTensor(name=PROBS_NAME, datatype="FP32", shape=list(probs.shape))
        return pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id,
                                     outputs=[out], raw_output_contents=[probs.astype("<f4").tobytes()])


class GrpcServer:
    """The gRPC door's lifecycle: ``start()`` on the running loop, ``stop()`` at shutdown."""

    def __init__(self, inference: Inference, host: str, port: int, max_message_bytes: int) -> None:
        self.inference, self.address = inference, f"{host}:{port}"
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(inference), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_insecure_port(self.address)

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(self.inference.repository.ready)
        log.info("gRPC inference server on %s", self.address)

    async def set_serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "inference.GRPCInferenceService"):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
