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
