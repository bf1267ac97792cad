"""The gRPC door's call intake (``serving.oip_grpc.CallIntake``), in process on a minimal grpc.aio server: it takes
calls beside grpc.aio's own intake, each answered by its method (statuses included), refuses those past the
worker's limit before their method sees them, frees a call's place before its answer leaves, gives up the place of
a call whose message does not come, and ends with the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving.errors import ServingError, TooManyRequests
from serving.oip_grpc import _INTAKE_PLACE, INFER_METHOD, MESSAGE_WAIT_S, CallIntake, add_inference_servicer


class Limit:
    """At most ``most`` calls in progress: ``CallIntake``'s admit and release."""

    def __init__(self, most: int = 10**9) -> None:
        self.most, self.in_progress = most, 0

    def admit(self) -> ServingError | None:
        if self.in_progress >= self.most:
            return TooManyRequests(f"full at {self.in_progress}", 1.0)
        self.in_progress += 1
        return None

    def release(self) -> None:
        self.in_progress -= 1


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with the request's id after ``delay_s``, holding a place under ``limit`` as the service's
    method does (the intake's place, or one of its own for the calls grpc.aio's intake took); refuses ids starting
    with "refuse". Notes the ids it admitted, and the most intake-admitted calls it ran at once."""

    def __init__(self, limit: Limit, delay_s: float = 0.05) -> None:
        self.limit, self.delay_s, self.seen = limit, delay_s, set[str]()
        self.running = self.most_running = 0

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        place = _INTAKE_PLACE.get()
        refusal = self.limit.admit() if place is None else place.start()
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message)
        self.seen.add(request.id)
        admitted = place is not None
        self.running += admitted
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.running -= admitted
            if place is None:
                self.limit.release()
            else:
                place.end()
        if request.id.startswith("refuse"):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused by the method")
        return pb.ModelInferResponse(id=request.id)


@contextlib.asynccontextmanager
async def serving(echo: Echo, width: int = 8) -> AsyncIterator[tuple[CallIntake, grpc.aio.Channel]]:
    """A server with ``echo`` and an intake ``width`` wide under echo's limit, and a channel to it; the server is
    stopped on the way out."""
    server, limit = grpc.aio.server(), echo.limit
    handlers = add_inference_servicer(echo, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert CallIntake.available(server), "this grpcio's private functions changed: update serving.oip_grpc.CallIntake"
    intake = CallIntake(server, INFER_METHOD, handlers, limit.admit, limit.release, width)
    await server.start()
    intake.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield intake, channel
    finally:
        await server.stop(1)


async def call(channel: grpc.aio.Channel, call_id: str) -> str:
    """The call's outcome: "ok", or the status code's name and message."""
    try:
        response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(id=call_id))
        return "ok" if response.id == call_id else "wrong answer"
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


async def serve_and_call(ids: list[str], width: int = 8, echo: Echo | None = None) -> tuple[CallIntake, list[str]]:
    """A concurrent call per id; the intake and each call's outcome once the server has stopped."""
    async with serving(echo or Echo(Limit()), width) as (intake, channel):
        outcomes = await asyncio.gather(*(call(channel, i) for i in ids))
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
        await asyncio.sleep(MESSAGE_WAIT_S)  # the sweep looks twice per MESSAGE_WAIT_S
        assert all(task.done() for task in intake._tasks)
        assert not [task for task in intake._tasks if not task.cancelled() and task.exception()]

    asyncio.run(scenario())


def test_calls_past_the_limit_are_refused_as_taken_and_never_reach_their_method():
    limit = Limit(5)
    echo = Echo(limit)
    ids = [str(i) for i in range(200)]
    _, outcomes = asyncio.run(serve_and_call(ids, width=16, echo=echo))
    refused = [i for i, outcome in zip(ids, outcomes, strict=True) if outcome != "ok"]
    assert refused and len(refused) < len(ids), outcomes
    assert {outcomes[int(i)] for i in refused} == {"RESOURCE_EXHAUSTED: full at 5"}
    assert not echo.seen & set(refused)  # refused before the method, or its message, was looked at (or by it)
    assert 0 < echo.most_running <= 5  # the intake counted its calls from when it took them
    assert limit.in_progress == 0  # every admitted call was released as it ended


def test_a_client_within_the_limit_is_never_refused():
    # one call at a time against a limit of one: each call's place must be free before its answer reaches the
    # client (freed only when grpc core closed the call, the next call was refused now and then: an outside probe)
    async def scenario() -> list[str]:
        async with serving(Echo(Limit(1), delay_s=0), width=16) as (_, channel):
            return [await call(channel, str(i)) for i in range(300)]

    outcomes = asyncio.run(scenario())
    assert outcomes == ["ok"] * 300, [o for o in outcomes if o != "ok"][:3]


def test_a_call_whose_message_does_not_come_gives_its_place_up():
    async def scenario() -> None:
        limit = Limit(1)
        async with serving(Echo(limit, delay_s=0), width=16) as (intake, channel):
            open_stalled = channel.stream_unary(INFER_METHOD, request_serializer=pb.ModelInferRequest.SerializeToString,
                                                response_deserializer=pb.ModelInferResponse.FromString)

            async def message_when(sent: asyncio.Event) -> AsyncIterator[pb.ModelInferRequest]:
                await sent.wait()
                yield pb.ModelInferRequest(id="late")

            await channel.channel_ready()
            stalled = []  # calls that send their headers now and their message when told
            while not intake.waiting and len(stalled) < 20:  # until one is taken by the intake, not grpc.aio's
                sent, taken = asyncio.Event(), intake.taken
                stalled.append((sent, open_stalled(message_when(sent))))
                for _ in range(100):  # taken by one intake or the other before the next is opened
                    await asyncio.sleep(0.02)
                    if intake.taken > taken or intake.waiting:
                        break
            assert intake.waiting and limit.in_progress == 1
            assert (await call(channel, "while held")).startswith("RESOURCE_EXHAUSTED")
            for _ in range(50):  # the sweep gives it up 1-1.5 s after it was taken
                await asyncio.sleep(0.1)
                if not intake.waiting:
                    break
            assert not intake.waiting and limit.in_progress == 0  # given up, and counted so
            assert [await call(channel, f"after {i}") for i in range(5)] == ["ok"] * 5
            for sent, stalled_call in stalled:  # their messages come, one at a time: each admitted anew
                sent.set()
                assert (await stalled_call).id == "late"
            assert limit.in_progress == 0

    asyncio.run(scenario())
