"""The gRPC door's call intake (``serving.oip_grpc.CallIntake``), in process on a minimal grpc.aio server: it takes
calls beside grpc.aio's own intake, each answered by its method (statuses included), refuses those past the
worker's limit before their method sees them, and ends with the server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving.errors import ServingError, TooManyRequests
from serving.oip_grpc import _ADMITTED_BY_INTAKE, INFER_METHOD, CallIntake, add_inference_servicer


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with the request's id after a short wait; refuses ids starting with "refuse". Notes the
    ids it saw, and the most calls admitted by the intake that it ran at once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.running = self.most_running = 0

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        self.seen.add(request.id)
        admitted = _ADMITTED_BY_INTAKE.get()
        self.running += admitted
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.running -= admitted
        if request.id.startswith("refuse"):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused by the method")
        return pb.ModelInferResponse(id=request.id)


class Limit:
    """At most ``most`` calls in progress: ``CallIntake``'s admit and release."""

    def __init__(self, most: int) -> None:
        self.most, self.in_progress = most, 0

    def admit(self) -> ServingError | None:
        if self.in_progress >= self.most:
            return TooManyRequests(f"full at {self.in_progress}", 1.0)
        self.in_progress += 1
        return None

    def release(self) -> None:
        self.in_progress -= 1


async def serve_and_call(ids: list[str], width: int = 8, limit: Limit | None = None,
                         echo: Echo | None = None) -> tuple[CallIntake, list[str]]:
    """A server with ``echo`` and an intake ``width`` wide under ``limit`` (none: no limit), a concurrent call per
    id; the intake and each call's outcome ("ok", or the status code's name and message) once the server has
    stopped."""
    server = grpc.aio.server()
    handlers = add_inference_servicer(echo or Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert CallIntake.available(server), "this grpcio's private functions changed: update serving.oip_grpc.CallIntake"
    limit = limit or Limit(10**9)
    intake = CallIntake(server, INFER_METHOD, handlers, limit.admit, limit.release, width)
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


def test_calls_past_the_limit_are_refused_as_taken_and_never_reach_their_method():
    limit, echo = Limit(5), Echo()
    ids = [str(i) for i in range(200)]
    _, outcomes = asyncio.run(serve_and_call(ids, width=16, limit=limit, echo=echo))
    refused = [i for i, outcome in zip(ids, outcomes, strict=True) if outcome != "ok"]
    assert refused and len(refused) < len(ids), outcomes
    assert {outcomes[int(i)] for i in refused} == {"RESOURCE_EXHAUSTED: full at 5"}
    assert not echo.seen & set(refused)  # refused before the method, or its message, was looked at
    assert 0 < echo.most_running <= 5  # the intake counted its calls from when it took them, and said so
    assert limit.in_progress == 0  # every admitted call was released as it ended
