"""Tensor datatypes: the KServe v2 names, Triton's config enums, NumPy and ONNX.

One table keeps the four vocabularies in step. BYTES tensors are NumPy object arrays
of ``bytes``; on the wire each element is a 4-byte little-endian length and its bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.errors import InvalidArgumentError


@dataclass(frozen=True, slots=True)
class DataType:
    """One tensor datatype under all the names the server meets it by."""

    name: str  # KServe v2 / wire name: "FP32"
    config_type: int  # model_config_pb2.DataType value: TYPE_FP32
    numpy: np.dtype  # object for BYTES
    onnx: int  # onnx.TensorProto elem type
    itemsize: int  # bytes per element on the wire, 0 for BYTES


def _dt(name: str, config_type: int, np_type: type | str, onnx_type: int) -> DataType:
    dtype = np.dtype(np_type)
    return DataType(name, config_type, dtype, onnx_type, 0 if name == "BYTES" else dtype.itemsize)


# onnx.TensorProto values, written out so that importing this module does not load onnx.
_ALL = (
    _dt("BOOL", mc.TYPE_BOOL, np.bool_, 9),
    _dt("UINT8", mc.TYPE_UINT8, np.uint8, 2),
    _dt("UINT16", mc.TYPE_UINT16, np.uint16, 4),
    _dt("UINT32", mc.TYPE_UINT32, np.uint32, 12),
    _dt("UINT64", mc.TYPE_UINT64, np.uint64, 13),
    _dt("INT8", mc.TYPE_INT8, np.int8, 3),
    _dt("INT16", mc.TYPE_INT16, np.int16, 5),
    _dt("INT32", mc.TYPE_INT32, np.int32, 6),
    _dt("INT64", mc.TYPE_INT64, np.int64, 7),
    _dt("FP16", mc.TYPE_FP16, np.float16, 10),
    _dt("FP32", mc.TYPE_FP32, np.float32, 1),
    _dt("FP64", mc.TYPE_FP64, np.float64, 11),
    _dt("BYTES", mc.TYPE_STRING, np.object_, 8),
)

BY_NAME: dict[str, DataType] = {d.name: d for d in _ALL}
BY_CONFIG: dict[int, DataType] = {d.config_type: d for d in _ALL}
BY_ONNX: dict[int, DataType] = {d.onnx: d for d in _ALL}
BY_NUMPY: dict[np.dtype, DataType] = {d.numpy: d for d in _ALL}


def from_name(name: str) -> DataType:
    """The datatype for a wire name, or a 400 naming the ones we know."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unsupported datatype '{name}', expected one of {', '.join(BY_NAME)}"
        ) from None


def from_numpy(dtype: np.dtype) -> DataType:
    """The datatype of a NumPy array; unicode and bytes arrays are BYTES."""
    if dtype.kind in ("U", "S", "O"):
        return BY_NAME["BYTES"]
    try:
        return BY_NUMPY[dtype]
    except KeyError:
        raise InvalidArgumentError(f"unsupported numpy dtype {dtype}") from None


def config_type_name(config_type: int) -> str:
    """``TYPE_FP32`` for the enum value, as Triton's config JSON spells it."""
    return str(mc.DataType.Name(config_type))  # type: ignore[arg-type]


# No tensor dimension product may pass this, not even of a tensor with a zero dim (NumPy
# refuses such shapes with an error of its own); real tensors are far smaller.
MAX_ELEMENTS = 1 << 48


def element_count(shape: tuple[int, ...], name: str) -> int:
    """The number of elements of ``shape``, or a 400 for a shape no request could fill."""
    count = math.prod(shape)
    if count > MAX_ELEMENTS or (
        count == 0 and math.prod(max(dim, 1) for dim in shape) > MAX_ELEMENTS
    ):
        raise InvalidArgumentError(f"input '{name}': shape {list(shape)} is too large")
    return count


def deserialize_bytes(buffer: memoryview | bytes, count: int, name: str) -> np.ndarray:
    """Decode ``count`` length-prefixed elements; the buffer must hold exactly them.

    Each element needs at least its 4-byte length, so a count the buffer cannot back is
    refused before anything is allocated for it."""
    view = memoryview(buffer)
    size = len(view)
    if count * 4 > size:
        raise InvalidArgumentError(
            f"input '{name}': {count} BYTES elements need at least {count * 4} bytes, got {size}"
        )
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + 4 > size:
            raise InvalidArgumentError(
                f"input '{name}': BYTES data ends after {i} of {count} elements"
            )
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > size:
            raise InvalidArgumentError(
                f"input '{name}': BYTES element {i} claims {length} bytes, "
                f"only {size - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != size:
        raise InvalidArgumentError(
            f"input '{name}': {size - offset} unexpected bytes after {count} BYTES elements"
        )
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    """Encode a BYTES (or unicode) tensor as length-prefixed elements in C order."""
    parts: list[bytes] = []
    pack = struct.Struct("<I").pack
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def wire_view(array: np.ndarray) -> bytes | memoryview:
    """The raw wire form as a view over the tensor where it is contiguous, without the copy
    ``tobytes`` makes; for writers that take any buffer (a socket), not protobuf fields."""
    if array.dtype.kind in ("O", "U", "S") or array.size == 0:
        return to_wire_bytes(array)
    return memoryview(np.ascontiguousarray(array)).cast("B")  # type: ignore[arg-type]


def to_wire_bytes(array: np.ndarray) -> bytes:
    """The raw wire form of a tensor: little-endian C-order bytes, or framed BYTES."""
    if array.dtype.kind in ("O", "U", "S"):
        return serialize_bytes(array)
    return np.ascontiguousarray(array).tobytes()


def from_wire_bytes(
    buffer: memoryview | bytes, datatype: DataType, shape: tuple[int, ...], name: str
) -> np.ndarray:
    """A tensor viewed over its raw wire form without copying (BYTES are decoded)."""
    count = element_count(shape, name)
    if datatype.name == "BYTES":
        return deserialize_bytes(buffer, count, name).reshape(shape)
    expected = count * datatype.itemsize
    if len(buffer) != expected:
        raise InvalidArgumentError(
            f"input '{name}': expected {expected} bytes of {datatype.name} data for shape "
            f"{list(shape)}, got {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=datatype.numpy).reshape(shape)
