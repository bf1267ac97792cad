"""The gRPC door's call intake (``serving.oip_grpc.CallIntake``), in process on a minimal grpc.aio server: it takes
calls beside grpc.aio's own intake, each answered by its method (statuses included), and ends with the server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving.oip_grpc import INFER_METHOD, CallIntake, add_inference_servicer


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with the request's id after a short wait; refuses ids starting with "refuse"."""

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        await asyncio.sleep(0.05)
        if request.id.startswith("refuse"):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused by the method")
        return pb.ModelInferResponse(id=request.id)


async def serve_and_call(ids: list[str], width: int = 8) -> tuple[CallIntake, list[str]]:
    """A server with ``Echo`` and an intake ``width`` wide, a concurrent call per id; the intake and each call's
    outcome ("ok", or the status code's name and message) once the server has stopped."""
    server = grpc.aio.server()
    handlers = add_inference_servicer(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert CallIntake.available(server), "this grpcio's private functions changed: update serving.oip_grpc.CallIntake"
    intake = CallIntake(server, INFER_METHOD, handlers, lambda: False, width)
    await server.start()
    intake.start()

    async def call(channel: grpc.aio.Channel, call_id: str) -> str:
        try:
            response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(id=call_id))
            return "ok" if response.id == call_id else "wrong answer"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        outcomes = await asyncio.gather(*(call(channel, i) for i in ids))
    await server.stop(1)
    return intake, outcomes


def test_the_intake_takes_most_calls_and_each_is_answered_by_its_method():
    ids = [str(i) for i in range(200)] + [f"refuse {i}" for i in range(20)]
    intake, outcomes = asyncio.run(serve_and_call(ids))
    assert outcomes == ["ok"] * 200 + ["RESOURCE_EXHAUSTED: refused by the method"] * 20
    # 8 requests for the next call outstanding against grpc.aio's 1: most calls come through the intake
    assert intake.taken >= 110, intake.taken


@pytest.mark.parametrize("calls", [0, 20])
def test_the_intake_ends_with_the_server(calls):
    async def scenario() -> None:
        intake, outcomes = await serve_and_call([str(i) for i in range(calls)])
        assert outcomes == ["ok"] * calls
        await asyncio.sleep(0.1)
        assert all(task.done() for task in intake._intakes)
        assert not [task for task in intake._intakes if not task.cancelled() and task.exception()]

    asyncio.run(scenario())
