"""Open Inference Protocol gRPC (``inference.GRPCInferenceService``) plus ``grpc.health.v1.Health`` and server
reflection (so that grpcurl, grpc_cli or Postman can list and call the services without the .proto files).

Uses tritonclient's maintained generated stubs (Triton's superset of the OIP service, ModelConfig
included). Runs as a ``grpc.aio`` server on the service worker's event loop, so it shares the
worker's model repository and batchers; several workers share the port through SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving.dataplane import SERVER_NAME, DataPlane, count_failure, count_refusal
from serving.errors import INTERNAL_ERROR, InvalidInput, ServingError, TooManyRequests, log_refusal
from serving.metrics import observe_shed
from serving.model_card import PROBS_NAME
from serving.oip import check_outputs, decode_input, output_tensor, timeout_deadline
from serving.settings import Settings

try:  # grpc's private class for a send that grpc core refused (``_abort``)
    from grpc._cython.cygrpc import ExecuteBatchError
except ImportError:  # another grpcio: such a failure is logged by grpc.aio as before
    class ExecuteBatchError(Exception):  # type: ignore[no-redef]
        pass

log = logging.getLogger("cnnserve.grpc")

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"

# a call's place among the worker's calls in progress, in the tasks of the calls that CallIntake took (None in the
# calls grpc.aio's own intake took: their method counts them)
_INTAKE_PLACE: contextvars.ContextVar[Place | None] = contextvars.ContextVar("intake_place", default=None)

# how long a call taken by CallIntake keeps its place while its message has not arrived; past it the place is given
# up and the call admitted anew when its message comes (a client that opens calls and sends nothing, or a slow one,
# could otherwise hold every place of a worker)
MESSAGE_WAIT_S = 1.0

# requests of one ModelStreamInfer stream in progress at once (they batch with each other); past it the stream is
# not read, which bounds what one stream can hold in memory like the server's limit on concurrent calls does
STREAM_WINDOW = 64

# a status's details past this many bytes are cut (``_details``)
MAX_DETAILS_BYTES = 2000


class _Undecodable:
    """A request that could not be parsed (``_tolerant``): a guarded method answers INVALID_ARGUMENT with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``parse``, returning ``_Undecodable`` instead of raising: grpc.aio parses a request before the method runs,
    and answered a malformed one (invalid UTF-8 in a string field, stray bytes) with UNKNOWN and an ERROR
    traceback in the log."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(f"the request is not a valid protobuf message of this method: {exc}")

    return deserialize


def _trailers(exc: ServingError) -> tuple[tuple[str, str], ...]:
    """The refusal's retry hint as gRPC has one: ``grpc-retry-pushback-ms``, which a client's retry policy honours
    (HTTP answers ``Retry-After``), where the refusal says when to come back."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    return () if retry_after_s is None else (("grpc-retry-pushback-ms", str(max(1, round(retry_after_s * 1000)))),)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
    """``context.abort(code, message, trailers)``; where grpc core has ended the call already (its deadline passed,
    or the client went away, while the method ran) nothing can be sent, and the call ends as cancelled instead: the
    failed send was an ERROR with a 40-line traceback in the log for each such call (an outside probe's calls with
    1 ms deadlines). ``ExecuteBatchError`` is grpc's private class for that failure.

    grpc keeps the ``AbortError`` it raises on the call's state, and the error's traceback holds the frames that
    hold that state, and through the refusal it was raised while handling (``__context__``), the frames that hold
    the request: a reference cycle, freed only by a full garbage collection. An outside probe's refused 60 MB calls
    took a worker from 0.8 to 2.1 GB in ten calls. Once the call is done, the error lets go of both."""
    try:
        await context.abort(code, _details(message), trailers)
    except ExecuteBatchError:
        raise asyncio.CancelledError from None
    except grpc.aio.AbortError as aborted:
        # not the context's add_done_callback: grpc keeps those on the call's state, bound to the context, which
        # is a cycle of its own; the task's callbacks are let go once they run
        if (task := asyncio.current_task()) is not None:
            task.add_done_callback(functools.partial(_let_go, aborted))
        raise


def _details(message: str) -> str:
    """``message`` as a status's details, cut to ``MAX_DETAILS_BYTES`` of UTF-8: they travel as a trailer, which
    clients take up to 8-16 KiB of, percent-encoded (an error naming a 16 KB model name reached the client as
    ``RESOURCE_EXHAUSTED`` "received metadata size exceeds hard limit")."""
    data = message.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    return f"{data[:MAX_DETAILS_BYTES].decode(errors='ignore')}... ({len(message)} characters in all)"


def _let_go(aborted: BaseException, _task: object) -> None:
    """Break the reference cycle of an ended call's ``AbortError`` (``_abort``): grpc has caught it by now."""
    aborted.__traceback__ = aborted.__context__ = aborted.__cause__ = None


def _guard(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``ServingError`` into a gRPC status with its message (a request that could not be parsed too)."""

    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise InvalidInput(request.reason)
            return await method(self, request, context)
        except ServingError as exc:
            log_refusal(exc, "oip-grpc")
            if method.__name__ == "ModelInfer":  # an inference request: counted in cnnserve_requests_total
                count_refusal(exc, "oip-grpc")
            await _abort(context, exc.grpc_code, exc.message, _trailers(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a defect: logged and counted (grpc would answer UNKNOWN with its repr)
            log.exception("a gRPC %s call failed", method.__name__)
            if method.__name__ == "ModelInfer":
                count_failure(exc, "oip-grpc")
            await _abort(context, grpc.StatusCode.INTERNAL, INTERNAL_ERROR)

    wrapper.__name__ = method.__name__
    return wrapper


def _tensor_metadata(tensors: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(**t) for t in tensors]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, max_in_progress: int = 0) -> None:
        """``max_in_progress``: ``ModelInfer`` calls in progress past which a new one is refused with
        RESOURCE_EXHAUSTED (0: no limit)."""
        self.dataplane, self.max_in_progress = dataplane, max_in_progress
        self.in_progress = 0

    def admit(self) -> TooManyRequests | None:
        """Count one more call in progress (``release()`` ends it), or the refusal, counted, when the worker has
        its limit of calls in progress."""
        if not self.max_in_progress or self.in_progress < self.max_in_progress:
            self.in_progress += 1
            return None
        observe_shed("grpc", "concurrency")
        refusal = TooManyRequests(f"Too many requests: this worker has {self.in_progress} gRPC inference calls and "
                                  "streams in progress, its limit (CNNSERVE_GRPC_MAX_CONCURRENT_RPCS); retry later",
                                  1.0)
        refusal.counted = True  # in cnnserve_shed_requests_total only, as the HTTP door's (a probe saw it twice)
        return refusal

    def release(self) -> None:
        self.in_progress -= 1

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(self.dataplane.server_metadata(), pb.ServerMetadataResponse())

    @_guard
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @_guard
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.dataplane.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=_tensor_metadata(meta["inputs"]),
                                        outputs=_tensor_metadata(meta["outputs"]))

    @_guard
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        config = self.dataplane.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    @_guard
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        place = _INTAKE_PLACE.get()
        _INTAKE_PLACE.set(None)  # not for the tasks this call starts (the batcher's runner may be one)
        refusal = self.admit() if place is None else place.start()
        if refusal is not None:
            raise refusal
        try:
            return await self._infer(request, context)
        finally:  # the place is free before the answer is sent: a client within the limit is never refused
            if place is None:
                self.release()
            else:
                place.end()

    async def ModelStreamInfer(self, requests: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream (tritonclient's ``start_stream`` / ``async_stream_infer``,
        perf_analyzer ``--streaming``): each request is answered by one response, in the order the answers
        are ready, carrying the request's ``id`` and ``triton_final_response``; a request that fails is answered
        by its ``error_message`` and the stream goes on.

        Up to ``STREAM_WINDOW`` requests of a stream are read and not yet answered at once (they batch with each
        other); past that the stream is not read, and HTTP/2 flow control holds the client; a slot is freed when
        its answer is sent, so a client that never reads is held once gRPC's flow-control window is full.

        A stream is paced to what the model admits: while requests of its own are in progress and the model has no
        room (``_has_room``, which counts nothing), a request waits for one of them to end before it is admitted,
        so a stream is never refused for its own backlog; one with nothing in progress is refused like any
        request (others overload the server). When the client goes away, its requests still queued are dropped,
        never computed."""
        if (refusal := self.admit()) is not None:  # an open stream holds one of the worker's slots for its life
            log_refusal(refusal, "oip-grpc")  # counted by admit, in cnnserve_shed_requests_total
            await _abort(context, refusal.grpc_code, refusal.message, _trailers(refusal))
        try:
            async for response in self._stream(requests, context):
                yield response
        finally:
            self.release()

    async def _stream(self, requests: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        in_progress: set[asyncio.Task[None]] = set()
        running, ended = 0, asyncio.Condition()  # requests of this stream past admission, and a signal as one ends

        async def answer(request: Any) -> None:
            nonlocal running
            response = None
            try:
                while running and not self._has_room(request):  # its own requests ahead fill the model: wait
                    async with ended:
                        await ended.wait()
                running += 1
                try:
                    if isinstance(request, _Undecodable):
                        raise InvalidInput(request.reason)
                    response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
                except ServingError as exc:
                    log_refusal(exc, "oip-grpc")
                    count_refusal(exc, "oip-grpc")
                    response = _stream_error(request, exc.message)
                except Exception as exc:  # a defect: answer it on the stream, which serves on
                    log.exception("stream request failed")
                    response = _stream_error(request, f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    running -= 1
                    async with ended:
                        ended.notify()  # one request ended: room for about one more
            finally:
                if response is not None:  # None: cancelled with the stream
                    answers.put_nowait(response)

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    task = asyncio.create_task(answer(request))
                    in_progress.add(task)
                    task.add_done_callback(in_progress.discard)
                while in_progress:
                    await asyncio.wait(set(in_progress))
            finally:
                answers.put_nowait(None)  # the end of the answers, also when reading failed

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                response.infer_response.parameters["triton_final_response"].bool_param = True
                yield response
                window.release()  # sent: room for one more request of this stream
            await reader  # a failure to read the stream ends the call with its error
        finally:
            for task in (reader, *in_progress):
                task.cancel()

    def _has_room(self, request: Any) -> bool:
        """Whether ``request`` would be admitted now as far as load goes: the worker's event loop is not shedding
        and its model's queue has room for its images (True when it names no model that serves, or cannot be
        read: ``_infer`` answers that)."""
        if self.dataplane.loop_lag.shedding():
            return False
        try:
            model = self.dataplane.model(request.model_name, request.model_version)
            shape = request.inputs[0].shape if len(request.inputs) == 1 else ()
        except (ServingError, AttributeError):  # no such model; an undecodable request
            return True
        return model.batcher.has_room(shape[0] if shape and shape[0] > 0 else 1)

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """One infer request of either method, answered or refused with a ``ServingError``."""
        self.dataplane.check_loop_lag("oip-grpc")
        model = self.dataplane.model(request.model_name, request.model_version)
        max_images = self.dataplane.settings.max_images_per_request
        if len(request.inputs) != 1:
            raise InvalidInput(f"expected exactly one input tensor, 'images'; got {len(request.inputs)}")
        tensor = request.inputs[0]
        args = (model, tensor.name, tensor.datatype, list(tensor.shape), max_images)
        if request.raw_input_contents:
            if tensor.HasField("contents"):
                raise InvalidInput("input 'images' has both raw_input_contents and contents: send one")
            if len(request.raw_input_contents) != 1:
                raise InvalidInput("raw_input_contents must hold exactly one entry, for 'images'")
            images = decode_input(*args, raw=request.raw_input_contents[0])
        else:
            images = decode_input(*args, values=list(tensor.contents.uint_contents) if _has_uint_data(tensor)
                                  else None)
        classes = check_outputs([(o.name, _parameter(o, "classification")) for o in request.outputs])
        remaining = context.time_remaining()  # the call's gRPC deadline, if the client set one
        deadlines = [time.monotonic() + remaining if remaining is not None else None,
                     timeout_deadline(_parameter(request, "timeout"))]  # and the OIP timeout parameter
        deadline = min((d for d in deadlines if d is not None), default=None)
        probs = await self.dataplane.infer(model, images, "oip-grpc", deadline)
        output = output_tensor(probs, classes, model.card.labels)
        out = pb.ModelInferResponse.InferOutputTensor(name=PROBS_NAME, datatype=output.datatype, shape=output.shape)
        return pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id,
                                     outputs=[out], raw_output_contents=[output.raw()])

    @_guard
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        stats = self.dataplane.statistics(request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    @_guard
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        index = self.dataplane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in index])

    @_guard
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidInput("load takes no parameters here: the repository's files are the configuration")
        await self.dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_guard
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _stream_error(request: Any, message: str) -> pb.ModelStreamInferResponse:
    """A stream's answer to a request that failed: the message, and the request's id and model when it has them."""
    if isinstance(request, _Undecodable):
        return pb.ModelStreamInferResponse(error_message=message)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version))


def _parameter(message: Any, name: str) -> Any:
    """The value of the parameter ``name`` of a request or a requested output (whichever of the protocol's kinds it
    has), or None."""
    if name not in message.parameters:
        return None
    parameter = message.parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def _has_uint_data(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    """Whether the tensor carries its data in ``contents.uint_contents`` (where UINT8 belongs); data in
    another ``contents`` field (e.g. ``fp32_contents``) is a datatype error, reported as such."""
    filled = [f.name for f, _ in tensor.contents.ListFields()]
    other = [name for name in filled if name != "uint_contents"]
    if other and tensor.datatype in ("UINT8", ""):  # another datatype: decode_input says so
        raise InvalidInput(f"input 'images' carries its data in contents.{other[0]}, but its datatype is "
                           f"{tensor.datatype or 'unset'}; UINT8 data goes in contents.uint_contents or "
                           "raw_input_contents")
    return bool(filled)


def _unimplemented(name: str) -> Callable[..., Any]:
    async def method(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by {SERVER_NAME}")

    method.__name__ = name
    return method


# every other method of Triton's service answers UNIMPLEMENTED with a message (the generated base class
# raises NotImplementedError instead, which grpc logs as an error with a traceback)
for _method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in vars(InferenceServicer):
        setattr(InferenceServicer, _method.name, _unimplemented(_method.name))


class _Registration:
    """Stands in for the server in the generated ``add_..._to_server`` function, to keep what it registers."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_inference_servicer(servicer: pb_grpc.GRPCInferenceServiceServicer, server: grpc.aio.Server) -> dict[str, Any]:
    """Register ``servicer`` as the generated stubs do, its requests parsed by ``_tolerant``; returns the method
    handlers by full method name (``/inference.GRPCInferenceService/ModelInfer``), for ``CallIntake``."""
    registration = _Registration()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registration)
    handlers = {name: handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
                for name, handler in registration.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(registration.service, handlers),))
    server.add_registered_method_handlers(registration.service, handlers)
    return {f"/{registration.service}/{name}": handler for name, handler in handlers.items()}


class CallIntake:
    """Takes ``ModelInfer`` calls from grpc core ``width`` at a time, beside grpc.aio's own intake, and admits or
    refuses each as it takes it.

    grpc.aio's server loop asks core for the next call of a method only once it has taken up the last one, through
    a task per call and an ``asyncio.wait`` round: one call per method per turn of the event loop at best, and under
    load a turn takes milliseconds, so calls waited in core (grpc's pending backlog, past whose bound it answers
    ``CANCELLED``) while the worker had CPU to spare. Here ``width`` coroutines each keep a request for the next
    call outstanding, so core hands over calls as they arrive and a turn of the loop takes up as many as arrived;
    each admitted call then runs as grpc.aio runs it (``_handle_rpc`` in ``_schedule_rpc_coro``: deadlines,
    cancellation, status). ``python -m benchmarks.grpc_floor`` (a minimal ModelInfer server on one core,
    perf_analyzer on the other): 9,013 calls/s at 16 clients with grpc.aio's intake alone on uvloop, 12,398 with 16
    of these beside it.

    A call is counted against the worker's limit when it is taken (``admit``), not when its method starts turns of
    the loop later, and one past the limit is refused in the same turn with a single batch of core operations,
    before its message is read: grpc.aio's own refusal took three more turns and two tasks. These are grpc.aio's
    private functions (grpcio 1.85): ``available()`` checks their signatures, and the service keeps grpc.aio's
    intake alone where they differ."""

    def __init__(self, server: grpc.aio.Server, method: str, handlers: dict[str, Any],
                 admit: Callable[[], ServingError | None], release: Callable[[], None], width: int) -> None:
        """``handlers``: the method handlers by full method name; ``admit()``: count a call in progress, or the
        refusal to send when the worker is full; ``release()``: an admitted call ended. The method finds the call's
        ``Place`` in ``_INTAKE_PLACE``, and calls its ``start()`` and ``end()``. Server interceptors are not applied
        to the calls taken here (the service sets none)."""
        from grpc._cython import cygrpc

        self._cygrpc, self._core, self._method = cygrpc, server._server, method
        self._resolver = cygrpc._MethodResolver([], handlers)
        self.admit, self.release, self._width = admit, release, width
        self._tasks: list[asyncio.Task[None]] = []  # the intakes and the sweep
        self._calls: set[asyncio.Task[None]] = set()
        self.waiting: dict[Place, None] = {}  # places of calls whose method has not started, oldest first
        self.taken = 0  # calls this intake took up

    @staticmethod
    def available(server: grpc.aio.Server) -> bool:
        """Whether this grpcio has the private functions, with the arguments, that the intake calls."""
        try:
            from grpc._cython import cygrpc

            def args(f: Any) -> tuple[str, ...]:
                return f.__code__.co_varnames[:f.__code__.co_argcount]

            return (args(cygrpc._handle_rpc) == ("method_name", "method_resolver", "interceptors", "rpc_state",
                                                  "loop", "concurrency_exceeded")
                    and args(cygrpc._schedule_rpc_coro) == ("rpc_coro", "rpc_state", "loop", "method_name")
                    and args(cygrpc.execute_batch) == ("grpc_call_wrapper", "operations", "loop")
                    and args(type(server._server)._request_registered_call) == ("self", "method")
                    and hasattr(cygrpc, "_MethodResolver") and hasattr(cygrpc, "_RequestCallError")
                    and hasattr(cygrpc, "SendInitialMetadataOperation")
                    and hasattr(cygrpc, "ReceiveCloseOnServerOperation")
                    and hasattr(cygrpc, "SendStatusFromServerOperation"))
        except (ImportError, AttributeError):
            return False

    def start(self) -> None:
        """Start taking calls (the server is started)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._take_calls(loop)) for _ in range(self._width)]
        self._tasks.append(loop.create_task(self._sweep()))

    async def _sweep(self) -> None:
        """Give up the places of calls whose message has not come within ``MESSAGE_WAIT_S``."""
        while self._core.is_running():
            await asyncio.sleep(MESSAGE_WAIT_S / 2)
            since = time.monotonic() - MESSAGE_WAIT_S
            for place in list(self.waiting):
                if place.taken_at > since:
                    break
                del self.waiting[place]
                place.end()

    async def _take_calls(self, loop: asyncio.AbstractEventLoop) -> None:
        method = self._method.encode()
        try:
            while self._core.is_running():
                await self._take_one(loop, method)
        except self._cygrpc._RequestCallError:  # shutting down: core fails the requests it holds
            pass
        except Exception:  # a defect: this intake ends, grpc.aio's and the others take the calls
            log.exception("a gRPC call intake failed")

    async def _take_one(self, loop: asyncio.AbstractEventLoop, method: bytes) -> None:
        rpc_state = await self._core._request_registered_call(method)
        self.taken += 1
        if (refusal := self.admit()) is not None:  # counted by admit, in cnnserve_shed_requests_total
            log_refusal(refusal, "oip-grpc")
            self._refuse(rpc_state, refusal, loop)
            return
        place = Place(self)
        self.waiting[place] = None
        _INTAKE_PLACE.set(place)  # in this intake's context, which the call's tasks copy as they are created
        handling = self._cygrpc._handle_rpc(self._method, self._resolver, (), rpc_state, loop, False)
        call = loop.create_task(self._cygrpc._schedule_rpc_coro(handling, rpc_state, loop, self._method))
        _INTAKE_PLACE.set(None)
        self._calls.add(call)  # the loop keeps a weak reference only
        call.add_done_callback(functools.partial(self._ended, place))

    def _ended(self, place: Place, call: asyncio.Task[None]) -> None:
        """The call's task is done: its place is free if its method never freed it (cancelled, never read)."""
        self._calls.discard(call)
        self.waiting.pop(place, None)
        place.end()

    def _refuse(self, rpc_state: Any, refusal: ServingError, loop: asyncio.AbstractEventLoop) -> None:
        """End the call with ``refusal``'s status and message: core sends them as this turn of the loop starts the
        batch (a task would start it next turn)."""
        cygrpc = self._cygrpc
        # as grpc's own thread-pool server rejects a call: with the receive of the client's close in the batch, so
        # that core does not cancel the call (a cancel frame to the client) when it is released before the close
        ops = (cygrpc.SendInitialMetadataOperation((), 0), cygrpc.ReceiveCloseOnServerOperation(0),
               cygrpc.SendStatusFromServerOperation(_trailers(refusal), refusal.grpc_code.value[0],
                                                    _details(refusal.message), 0))
        _run_now(cygrpc.execute_batch(rpc_state, ops, loop))


class Place:
    """A call's place among the worker's calls in progress, taken with the call by ``CallIntake`` and held until its
    method ends (``end``: before its answer is sent), or until the call ends without its method running (its task
    done: cancelled, its message never read). A call whose message has not come within ``MESSAGE_WAIT_S`` gives its
    place up, and ``start`` admits it anew when its method starts."""

    __slots__ = ("held", "intake", "taken_at")

    def __init__(self, intake: CallIntake) -> None:
        self.intake, self.taken_at, self.held = intake, time.monotonic(), True

    def start(self) -> ServingError | None:
        """The method starts: None, or the refusal where the place was given up and the worker is full now."""
        self.intake.waiting.pop(self, None)
        if self.held:
            return None
        refusal = self.intake.admit()
        self.held = refusal is None
        return refusal

    def end(self) -> None:
        """Free the place, if the call holds it."""
        if self.held:
            self.held = False
            self.intake.release()


def _run_now(coroutine: Coroutine[Any, Any, Any]) -> None:
    """Run ``coroutine`` up to its first wait now, and on from each wait as the future it waits on completes, with
    no task around it: what an eagerly started task does (Python 3.12's ``eager_start``). It ends quietly where
    grpc core could not send (the call ended meanwhile), with its error logged otherwise. Nothing here holds the
    coroutine while it waits: the future it waits on does (through ``step``), and grpc's callback wrapper holds that
    future until core completes the batch, as it does for grpc.aio's own tasks."""

    def step(_: object = None) -> None:
        try:
            awaited = coroutine.send(None)
        except StopIteration:
            return
        except (ExecuteBatchError, asyncio.CancelledError):
            return
        except Exception:
            log.exception("a gRPC refusal failed")
            return
        if isinstance(awaited, asyncio.Future):
            awaited._asyncio_future_blocking = False  # what a task does with the future it is handed
            awaited.add_done_callback(step)
        else:  # a bare yield (``asyncio.sleep(0)``): on in the next turn
            asyncio.get_running_loop().call_soon(step)

    step()


class GrpcServer:
    """The gRPC door's lifecycle: ``start()`` on the running loop, ``stop()`` at shutdown."""

    def __init__(self, dataplane: DataPlane, settings: Settings) -> None:
        self.dataplane, self.address = dataplane, f"{settings.grpc_host}:{settings.grpc_port}"
        options = [
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 1),
        ]
        if settings.grpc_max_pending_calls > 0:
            # calls wait here before anything of the service sees them, unbounded by its admission control
            options += [("grpc.server.max_pending_requests", settings.grpc_max_pending_calls),
                        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.grpc_max_pending_calls)]
        if settings.grpc_max_connection_age_s > 0:
            # no grace limit (grpc's default): calls in flight on an aged connection run to their end, streams
            # included, while new calls go to a new connection (a 60 s grace cut every stream at about 90 s)
            options += [("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000))]
        self.server = grpc.aio.server(options=options)
        servicer = InferenceServicer(dataplane, settings.grpc_max_concurrent_rpcs)
        handlers = add_inference_servicer(servicer, self.server)
        self.intake: CallIntake | None = None
        if settings.grpc_intake_width > 0 and CallIntake.available(self.server):
            self.intake = CallIntake(self.server, INFER_METHOD, handlers, servicer.admit, servicer.release,
                                     settings.grpc_intake_width)
        elif settings.grpc_intake_width > 0:
            log.warning("grpcio %s: its private server functions are not those serving.oip_grpc.CallIntake calls; "
                        "gRPC calls are taken up by grpc.aio alone, one per turn of the event loop", grpc.__version__)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.grpc_reflection:
            services = (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(services, self.server)
        self.server.add_insecure_port(self.address)

    async def start(self) -> None:
        await self.server.start()
        if self.intake is not None:
            self.intake.start()
        await self.set_serving(self.dataplane.ready())
        log.info("gRPC inference server on %s", self.address)

    async def set_serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "inference.GRPCInferenceService"):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)
