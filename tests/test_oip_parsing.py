"""The OIP REST door's reads of a JSON body that avoid parsing it: the declared batch, and where booleans may hide
among the numbers (the server tests send whole requests; these pin each rule's cases)."""

import json

import pytest

from serving.errors import InvalidInput
from serving.oip_rest import declared_batch, may_hold_boolean_elements
from serving.tensors import reject_booleans


@pytest.mark.parametrize(("text", "expected"), [
    (b'{"inputs":[{"data":[0,true,2]}]}', True),  # compact
    (b'{\n  "inputs": [\n    {\n      "data": [\n        0,\n        false\n      ]\n    }\n  ]\n}', True),  # pretty
    (b'{"data":[' + b" " * 100 + b"true]}", True),  # more white space than the window looks back over
    (b'{"data":[[true, 0]]}', True),  # nested, first in its list
    (b'{"data":true}', False),  # a value, not an element: the parser's and the type check's business
    (b'{"inputs":[{"data":[0,1]}],"outputs":[{"parameters":{"binary_data":false}}]}', False),  # a parameter
    (b'{"id":"true","inputs":[{"data":[0,1]}]}', False),  # inside a string, after a quote
    (b'{"inputs":[{"data":[0,1,2]}]}', False),
])
def test_boolean_elements_are_found_from_the_literals(text, expected):
    assert may_hold_boolean_elements(text) is expected
    if expected:  # and the data the parse then gives is refused
        parsed = json.loads(text)
        with pytest.raises(InvalidInput, match="true / false are not pixel values"):
            reject_booleans(parsed["inputs"][0]["data"] if "inputs" in parsed else parsed["data"])


@pytest.mark.parametrize("values", [[0, 1, 255], [[0, 1], [2, 3]], [[[0.0, 12.0]]], [], 7])
def test_numbers_alone_are_not_refused(values):
    reject_booleans(values)


@pytest.mark.parametrize(("text", "expected"), [
    (b'{"inputs":[{"name":"images","shape":[3,28,28]}]}', 3),
    (b'{"parameters":{"shape":[5000]},"inputs":[{"shape":[ 2 ,28,28]}]}', 2),  # a request parameter first
    (b'{"outputs":[{"parameters":{"shape":[9]}}],"inputs":[{"shape":[4]}]}', 4),  # an output's first
    (b'{"inputs":[{"name":"images"}]}', None),
    (b'{"shape":[7]}', None),  # no inputs
])
def test_the_declared_batch_is_the_inputs_first_dimension(text, expected):
    assert declared_batch(text) == expected


def test_a_defect_in_the_infer_endpoint_is_a_counted_json_500_not_uvicorns_plain_text():
    """An exception that is not a refusal (a defect) gets the one error shape every HTTP answer has, a JSON object,
    and counts as "error" in ``cnnserve_requests_total``: before, the infer lane (past BentoML's error pages)
    let uvicorn answer ``Internal Server Error`` in plain text, and nothing counted it."""
    import asyncio

    from serving.metrics import REQUESTS
    from serving.oip_rest import InferEndpoint

    class BrokenDataPlane:
        def model(self, name, version):
            raise RuntimeError("a defect")

        class settings:  # as the DataPlane's attribute
            max_images_per_request = 1024

    errors = REQUESTS.labels(model="", door="oip-rest", outcome="error")
    before = errors._value.get()
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [], "path_params": {"model": "m"}}
    asyncio.run(InferEndpoint(lambda: BrokenDataPlane())(scope, receive, send))
    assert sent[0]["status"] == 500 and (b"content-type", b"application/json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"] and errors._value.get() == before + 1


def test_a_defect_in_a_grpc_call_is_internal_and_counted_not_grpcs_unknown_with_a_repr():
    import asyncio

    import grpc
    from tritonclient.grpc import service_pb2 as pb

    from serving.metrics import REQUESTS
    from serving.oip_grpc import InferenceServicer

    class BrokenDataPlane:
        def __getattr__(self, name):
            raise RuntimeError("a defect")

    class Context:
        async def abort(self, code, details="", trailing_metadata=()):  # grpc.aio.ServicerContext.abort
            self.code, self.details = code, details
            raise grpc.aio.AbortError()

        def time_remaining(self):
            return None

    errors = REQUESTS.labels(model="", door="oip-grpc", outcome="error")
    before = errors._value.get()
    servicer = InferenceServicer(BrokenDataPlane())
    for call, request in ((servicer.ModelInfer, pb.ModelInferRequest(model_name="m")),
                          (servicer.ModelReady, pb.ModelReadyRequest(name="m"))):
        context = Context()
        with pytest.raises(grpc.aio.AbortError):
            asyncio.run(call(request, context))
        assert context.code == grpc.StatusCode.INTERNAL and "a defect" not in context.details
    assert errors._value.get() == before + 1  # the inference call only
