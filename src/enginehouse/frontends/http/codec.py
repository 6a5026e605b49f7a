"""KServe v2 inference over HTTP: JSON tensors and Triton's binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes
(``Inference-Header-Content-Length`` says where the JSON ends). Binary inputs become
NumPy views over the body, without a copy. Responses put each output either in the
JSON or, when asked, after it as raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from enginehouse import datatypes
from enginehouse.core.regions import Region
from enginehouse.core.shared_memory import SharedMemoryRegions, served_regions
from enginehouse.errors import InvalidArgumentError, UnsupportedError
from enginehouse.messages import InferInput, InferRequest, InferResponse, SharedMemoryTarget


@dataclass(slots=True)
class OutputOptions:
    """How the client wants outputs encoded: binary by default, and per output."""

    binary_default: bool
    binary: dict[str, bool]


def _shape(value: Any, name: str) -> tuple[int, ...]:
    # ``type(d) is int``: JSON's true and false arrive as bools, an int subclass, and are no
    # dimensions. A loop, not all() over a generator: a third of the cost, per input.
    if type(value) is list:
        for d in value:
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(value)
    raise InvalidArgumentError(
        f"input '{name}': 'shape' must be a list of non-negative integers, got {value!r}"
    )


def _ragged(name: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"input '{name}': 'data' is ragged (nested lists differ)")


def _flatten(data: Any, rank: int, name: str) -> list[Any]:
    """The elements of JSON ``data``: a flat list, or lists nested like the shape, at most
    ``rank`` deep and rectangular. Walked with a stack, not recursion, so no depth a client
    sends can exhaust the interpreter's."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    # Every list at one depth must have one length, and every element one depth.
    lengths: dict[int, int] = {}
    leaf_depth = 0
    stack: list[tuple[list[Any], int]] = [(data, 1)]
    while stack:
        items, depth = stack.pop()
        if depth > max(rank, 1):
            raise InvalidArgumentError(
                f"input '{name}': 'data' is nested deeper than the shape's {rank} dimensions"
            )
        if lengths.setdefault(depth, len(items)) != len(items):
            raise _ragged(name)
        nested = [isinstance(item, list) for item in items]
        if any(nested):
            if not all(nested) or (leaf_depth and depth >= leaf_depth):
                raise _ragged(name)
            stack.extend((item, depth + 1) for item in reversed(items))
        else:
            if leaf_depth and depth != leaf_depth:
                raise _ragged(name)
            leaf_depth = depth
            flat.extend(items)
    return flat


def _json_tensor(
    data: Any, dtype: datatypes.DataType, shape: tuple[int, ...], name: str
) -> np.ndarray:
    count = datatypes.element_count(shape, name)
    try:
        if dtype.name == "BYTES":
            flat = _flatten(data, len(shape), name)
            array = np.empty(len(flat), dtype=np.object_)
            for i, item in enumerate(flat):
                if isinstance(item, str):
                    array[i] = item.encode("utf-8")
                elif isinstance(item, bytes):
                    array[i] = item
                else:
                    raise InvalidArgumentError(
                        f"input '{name}': BYTES elements must be strings, got {type(item).__name__}"
                    )
        else:
            # A number past a float type's range becomes inf (integers: a 400); `serve` turns
            # NumPy's warning about it off once (a context manager here costs microseconds a
            # request).
            array = np.asarray(data, dtype=dtype.numpy)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgumentError(
            f"input '{name}': cannot read 'data' as {dtype.name}: {exc}"
        ) from None
    if array.size != count:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(shape)} needs {count} elements, 'data' has {array.size}"
        )
    return array.reshape(shape)


def decode_infer_request(
    model_name: str,
    model_version: str,
    body: bytes,
    header_length: int | None,
    regions: SharedMemoryRegions | None = None,
) -> tuple[InferRequest, OutputOptions]:
    """The request a body holds, or a 400 naming the first thing that is wrong. Tensors
    that name a shared-memory region are read from ``regions``."""
    header: bytes | memoryview
    binary: bytes | memoryview
    if header_length is None:  # all JSON: no view to cut
        header, binary = body, b""
    else:
        view = memoryview(body)
        if header_length < 0 or header_length > len(view):
            raise InvalidArgumentError(
                f"Inference-Header-Content-Length {header_length} is outside the body of "
                f"{len(view)} bytes"
            )
        header, binary = view[:header_length], view[header_length:]
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"malformed JSON in inference request: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("inference request must be a JSON object")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgumentError("inference request needs an 'inputs' list")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidArgumentError("request 'parameters' must be an object")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("request 'id' must be a string")

    inputs: list[InferInput] = []
    # Mapped regions read in place; made only for a request with a tensor in a region.
    in_place: list[Region] | None = None
    offset = 0
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidArgumentError("each input needs a 'name' string")
        name = raw["name"]
        datatype_name = raw.get("datatype")
        if not isinstance(datatype_name, str):
            raise InvalidArgumentError(f"input '{name}' needs a 'datatype' string")
        dtype = datatypes.from_name(datatype_name)
        shape = _shape(raw.get("shape"), name)
        input_parameters = raw.get("parameters") or {}
        if not isinstance(input_parameters, dict):
            raise InvalidArgumentError(f"input '{name}': 'parameters' must be an object")
        size = input_parameters.get("binary_data_size")
        if "shared_memory_region" in input_parameters:
            if "data" in raw or size is not None:
                raise InvalidArgumentError(
                    f"input '{name}' names a shared-memory region and carries data as well"
                )
            in_place = [] if in_place is None else in_place
            array = served_regions(regions).read_input(
                input_parameters, dtype, shape, name, in_place
            )
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgumentError(f"input '{name}': invalid binary_data_size {size!r}")
            if "data" in raw:
                raise InvalidArgumentError(f"input '{name}' has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidArgumentError(
                    f"input '{name}': binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            array = datatypes.from_wire_bytes(binary[offset : offset + size], dtype, shape, name)
            offset += size
        elif "data" in raw:
            array = _json_tensor(raw["data"], dtype, shape, name)
        else:
            raise InvalidArgumentError(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs.append(InferInput(name, datatype_name, shape, array))
    if offset != len(binary):
        raise InvalidArgumentError(
            f"{len(binary) - offset} bytes of binary data after the inputs that claim it"
        )

    binary_default = bool(parameters.get("binary_data_output", False))
    binary_outputs: dict[str, bool] = {}
    output_regions: dict[str, SharedMemoryTarget] | None = None
    names: list[str] | None = None
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidArgumentError("request 'outputs' must be a list")
        names = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidArgumentError("each requested output needs a 'name' string")
            output_parameters = raw.get("parameters") or {}
            if not isinstance(output_parameters, dict):
                raise InvalidArgumentError(
                    f"output '{raw['name']}': 'parameters' must be an object"
                )
            if "shared_memory_region" in output_parameters:
                if output_regions is None:
                    output_regions = {}
                output_regions[raw["name"]] = served_regions(regions).target(
                    output_parameters, raw["name"]
                )
            if output_parameters.get("classification"):
                raise UnsupportedError(
                    f"output '{raw['name']}': the classification extension is not supported yet"
                )
            names.append(raw["name"])
            if "binary_data" in output_parameters:
                binary_outputs[raw["name"]] = bool(output_parameters["binary_data"])
    request = InferRequest(
        model_name=model_name,
        inputs=inputs,
        model_version=model_version,
        id=request_id,
        outputs=names,
        parameters=parameters,
        output_regions=output_regions,
        regions_in_place=in_place or None,
    )
    return request, OutputOptions(binary_default, binary_outputs)


def _json_data(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.dtype == np.object_:
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in flat
        ]
    if flat.dtype == np.float16:
        return flat.astype(np.float32)
    return np.ascontiguousarray(flat)


def encode_infer_response(
    response: InferResponse, options: OutputOptions
) -> tuple[bytes, list[bytes | memoryview], int | None]:
    """(JSON header, raw output buffers, header length if any output is binary)."""
    buffers: list[bytes | memoryview] = []
    outputs = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.parameters is not None:
            # Written into a shared-memory region: as with Triton, the entry then has no data
            # and no parameters (NVIDIA's C++ client reads any output parameters as binary).
            pass
        elif options.binary.get(tensor.name, options.binary_default):
            raw = datatypes.wire_view(tensor.data)
            buffers.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = _json_data(tensor.data)
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return header, buffers, (len(header) if buffers else None)
