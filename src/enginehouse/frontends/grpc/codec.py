"""KServe v2 inference messages of gRPC to and from the core's request types.

Inputs come as raw bytes (``raw_input_contents``, one entry per input, in order) or as
typed contents; outputs always go back raw, as Triton sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from enginehouse import datatypes
from enginehouse.core.regions import Region
from enginehouse.core.shared_memory import SharedMemoryRegions, served_regions
from enginehouse.errors import InvalidArgumentError, UnsupportedError
from enginehouse.frontends.grpc.frames import varint
from enginehouse.messages import InferInput, InferRequest, InferResponse, SharedMemoryTarget

_RAW_INPUT_CONTENTS = pb.ModelInferRequest.RAW_INPUT_CONTENTS_FIELD_NUMBER
_LENGTH_DELIMITED = 2
_FIXED_SIZES = {1: 8, 5: 4}  # wire types fixed64 and fixed32

# Which typed-contents field carries each datatype (FP16 has none: it must go raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: pb.InferParameter) -> Any:
    """The Python value of an InferParameter, whichever type it holds."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def _typed_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, dtype: datatypes.DataType, shape: tuple[int, ...]
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(dtype.name)
    if field is None:
        raise InvalidArgumentError(
            f"input '{tensor.name}': {dtype.name} data must be sent in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    count = datatypes.element_count(shape, tensor.name)
    if len(values) != count:
        raise InvalidArgumentError(
            f"input '{tensor.name}': shape {list(shape)} needs {count} elements, "
            f"{field} has {len(values)}"
        )
    if dtype.name == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.asarray(values, dtype=dtype.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidArgumentError(f"input '{tensor.name}': {exc}") from None


def _parameters(parameters: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def decode_infer_request(
    message: pb.ModelInferRequest,
    raw_contents: Sequence[bytes | memoryview] | None = None,
    regions: SharedMemoryRegions | None = None,
) -> InferRequest:
    """The core request for a ModelInferRequest, or a 400-class error. ``raw_contents``
    stands in for the message's raw_input_contents when they were cut out of it. Inputs
    in shared memory are read from ``regions`` and have no raw_input_contents entry."""
    raw: Sequence[bytes | memoryview] = (
        message.raw_input_contents if raw_contents is None else raw_contents
    )
    inputs: list[InferInput] = []
    # Mapped regions read in place; made only for a request with a tensor in a region.
    in_place: list[Region] | None = None
    index = 0
    for tensor in message.inputs:
        name = tensor.name
        dtype = datatypes.from_name(tensor.datatype)
        shape = tuple(tensor.shape[:])  # a slice first: iterating the field is slower
        if shape and min(shape) < 0:
            raise InvalidArgumentError(f"input '{name}': shape {list(shape)} has a negative dim")
        parameters = tensor.parameters
        if parameters and "shared_memory_region" in parameters:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(
                    f"input '{name}' names a shared-memory region and carries contents as well"
                )
            in_place = [] if in_place is None else in_place
            array = served_regions(regions).read_input(
                _parameters(parameters), dtype, shape, name, in_place
            )
        elif raw:
            if index == len(raw):
                raise _raw_count_error(message, raw)
            if tensor.HasField("contents"):
                raise InvalidArgumentError(
                    f"input '{name}': contents and raw_input_contents are both set; a request "
                    "sends its tensors one way"
                )
            array = datatypes.from_wire_bytes(raw[index], dtype, shape, name)
            index += 1
        else:
            array = _typed_contents(tensor, dtype, shape)
        inputs.append(InferInput(name, tensor.datatype, shape, array))
    if raw and index != len(raw):
        raise _raw_count_error(message, raw)
    outputs: list[str] | None = None
    output_regions: dict[str, SharedMemoryTarget] | None = None
    if message.outputs:
        outputs = []
        for requested in message.outputs:
            if "shared_memory_region" in requested.parameters:
                if output_regions is None:
                    output_regions = {}
                output_regions[requested.name] = served_regions(regions).target(
                    _parameters(requested.parameters), requested.name
                )
            if "classification" in requested.parameters:
                raise UnsupportedError(
                    f"output '{requested.name}': the classification extension is not supported yet"
                )
            outputs.append(requested.name)
    parameters = _parameters(message.parameters) if message.parameters else {}
    return InferRequest(
        model_name=message.model_name,
        inputs=inputs,
        model_version=message.model_version,
        id=message.id,
        outputs=outputs,
        parameters=parameters,
        output_regions=output_regions,
        regions_in_place=in_place or None,
    )


def _raw_count_error(
    message: pb.ModelInferRequest, raw: Sequence[bytes | memoryview]
) -> InvalidArgumentError:
    """raw_input_contents has one entry per input not in shared memory, or this 400."""
    shared = sum(
        1 for t in message.inputs if t.parameters and "shared_memory_region" in t.parameters
    )
    return InvalidArgumentError(
        f"raw_input_contents has {len(raw)} entries for "
        f"{len(message.inputs) - shared} inputs not in shared memory"
    )


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    result = 0
    shift = 0
    while True:
        if position >= len(view):
            raise DecodeError("truncated message")
        byte = view[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise DecodeError("malformed varint")


def split_raw_contents(serialized: bytes | memoryview) -> tuple[bytes, list[memoryview]]:
    """A serialized ModelInferRequest without its raw_input_contents, and those contents as
    views of ``serialized``.

    Parsing a large request as a whole copies every tensor twice (into protobuf, then out
    as ``bytes``); with the tensors cut out first, only the small rest is parsed and the
    tensors stay where they arrived. Only the top level of the message is walked."""
    view = memoryview(serialized)
    end = len(view)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    position = 0
    while position < end:
        start = position
        key, position = _varint(view, position)
        wire = key & 7
        if wire == _LENGTH_DELIMITED:
            length, position = _varint(view, position)
            stop = position + length
            if stop > end:
                raise DecodeError("truncated message")
            if key >> 3 == _RAW_INPUT_CONTENTS:
                raw.append(view[position:stop])
            else:
                rest.append(view[start:stop])
            position = stop
            continue
        if wire == 0:
            _, position = _varint(view, position)
        elif wire in _FIXED_SIZES:
            position += _FIXED_SIZES[wire]
        else:
            raise DecodeError(f"unexpected wire type {wire}")
        if position > end:
            raise DecodeError("truncated message")
        rest.append(view[start:position])
    return b"".join(rest), raw


# Below this many output bytes a response is serialised whole: joining is cheaper than
# handing a socket writer many pieces.
LARGE_RESPONSE_BYTES = 64 << 10
_RAW_OUTPUT_TAG = bytes(
    [pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number << 3 | 2]
)


def encode_infer_response_wire(response: InferResponse) -> bytes | list[bytes | memoryview]:
    """The serialised ModelInferResponse: whole bytes for a small response; for a large one,
    the pieces that make it up, the outputs' own memory among them (protobuf's wire format
    lets repeated fields follow the rest of the message), so that a megabyte output is not
    copied into a message and then into frames before it reaches the socket."""
    sizes = [t.data.nbytes for t in response.outputs if t.parameters is None]
    if sum(sizes) < LARGE_RESPONSE_BYTES or any(
        t.data.dtype.kind in ("O", "U", "S") for t in response.outputs
    ):
        return encode_infer_response(response).SerializeToString()
    message = _response_message(response)
    parts: list[bytes | memoryview] = [message.SerializeToString()]
    for tensor in response.outputs:
        data = (
            memoryview(b"") if tensor.parameters is not None else datatypes.wire_view(tensor.data)
        )
        size = len(data)
        parts.append(_RAW_OUTPUT_TAG + varint(size))
        if size:
            parts.append(data)
    return parts


def encode_infer_response(response: InferResponse) -> pb.ModelInferResponse:
    """A ModelInferResponse with every output in raw_output_contents."""
    message = _response_message(response)
    raw = message.raw_output_contents
    for tensor in response.outputs:
        # An output written into a shared-memory region has an empty entry, which keeps
        # raw_output_contents aligned with the outputs: that is how clients find each
        # output's bytes.
        raw.append(b"" if tensor.parameters is not None else datatypes.to_wire_bytes(tensor.data))
    return message


def _response_message(response: InferResponse) -> pb.ModelInferResponse:
    """A ModelInferResponse with its outputs described and no raw_output_contents."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
    )
    for tensor in response.outputs:
        out = message.outputs.add()
        out.name = tensor.name
        out.datatype = tensor.datatype
        out.shape.extend(tensor.shape)
        if tensor.parameters is not None:  # written into a shared-memory region
            for key, value in tensor.parameters.items():
                if isinstance(value, str):
                    out.parameters[key].string_param = value
                else:
                    out.parameters[key].int64_param = value
    return message
