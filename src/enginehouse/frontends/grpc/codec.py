"""KServe v2 inference messages of gRPC to and from the core's request types.

Inputs come as raw bytes (``raw_input_contents``, one entry per input, in order) or as
typed contents; outputs always go back raw, as Triton sends them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from enginehouse import datatypes
from enginehouse.core.types import InferInput, InferRequest, InferResponse
from enginehouse.errors import InvalidArgumentError, UnsupportedError

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
    count = 1
    for dim in shape:
        count *= dim
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


def decode_infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """The core request for a ModelInferRequest, or a 400-class error."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    inputs: list[InferInput] = []
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        dtype = datatypes.from_name(tensor.datatype)
        shape = tuple(tensor.shape)
        if shape and min(shape) < 0:
            raise InvalidArgumentError(f"input '{name}': shape {list(shape)} has a negative dim")
        if tensor.parameters and "shared_memory_region" in tensor.parameters:
            raise UnsupportedError(f"input '{name}': shared memory inputs are not supported yet")
        if raw:
            array = datatypes.from_wire_bytes(raw[index], dtype, shape, name)
        else:
            array = _typed_contents(tensor, dtype, shape)
        inputs.append(InferInput(name, tensor.datatype, shape, array))
    outputs: list[str] | None = None
    if message.outputs:
        outputs = []
        for requested in message.outputs:
            if "shared_memory_region" in requested.parameters:
                raise UnsupportedError(
                    f"output '{requested.name}': shared memory outputs are not supported yet"
                )
            if "classification" in requested.parameters:
                raise UnsupportedError(
                    f"output '{requested.name}': the classification extension is not supported yet"
                )
            outputs.append(requested.name)
    parameters = (
        {key: parameter_value(value) for key, value in message.parameters.items()}
        if message.parameters
        else {}
    )
    return InferRequest(
        model_name=message.model_name,
        inputs=inputs,
        model_version=message.model_version,
        id=message.id,
        outputs=outputs,
        parameters=parameters,
    )


def encode_infer_response(response: InferResponse) -> pb.ModelInferResponse:
    """A ModelInferResponse with every output in raw_output_contents."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
    )
    raw = message.raw_output_contents
    for tensor in response.outputs:
        out = message.outputs.add()
        out.name = tensor.name
        out.datatype = tensor.datatype
        out.shape.extend(tensor.shape)
        raw.append(datatypes.to_wire_bytes(tensor.data))
    return message
