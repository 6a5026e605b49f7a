"""What a hostile or careless client can send, as hypothesis strategies, and the property
every decoder must keep: a request is decoded, or refused with one of the project's errors
of a 4xx class. Nothing else may escape (no IndexError, RecursionError, MemoryError, numpy's
ValueError...), and nothing may be allocated from a declared shape that the request's bytes
do not back. Used by tests/unit/test_fuzz.py (bounded, in CI) and bench/fuzz.py (long runs).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from enginehouse.core import loader
from enginehouse.core.model import ModelVersion
from enginehouse.errors import EnginehouseError
from enginehouse.frontends.grpc import codec as grpc_codec
from enginehouse.frontends.http import codec as http_codec
from enginehouse.messages import InferRequest
from enginehouse.repository import ModelLocation
from enginehouse.scheduler import InstanceSupervisor, scheduler_for

DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES"]
NAMES = ["INPUT0", "INPUT1", "OUTPUT0", "x", ""]


def text(max_size: int) -> st.SearchStrategy[str]:
    """Text that JSON can carry (no lone surrogates, which orjson rightly refuses)."""
    return st.text(st.characters(exclude_categories=("Cs",)), max_size=max_size)


dims = st.one_of(
    st.integers(0, 4),
    st.integers(-3, 2**63 - 1),
    st.sampled_from([2**31, 2**40, 2**62, 2**64, -(2**63)]),
)
shapes = st.lists(dims, max_size=5)
scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    text(max_size=8),
    st.booleans(),
    st.none(),
)
json_data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=40)


def deep(depth: int) -> Any:
    data: Any = "x"
    for _ in range(depth):
        data = [data]
    return data


ints16 = st.lists(st.integers(-(2**31), 2**31 - 1), min_size=16, max_size=16)
near_data = st.one_of(
    ints16,
    ints16.map(lambda row: [row]),
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=32, max_size=32),
    json_data,
    st.integers(1, 900).map(deep),
)


def mostly(
    usual: st.SearchStrategy[Any], unusual: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``usual`` about four times in five (hypothesis favours small integers, so the rare
    branch is the largest): deep enough into the decoders to reach their later
    checks, with the odd value often enough to hit each of them."""
    return st.integers(0, 4).flatmap(lambda pick: unusual if pick == 4 else usual)


near_shapes = mostly(st.sampled_from([[1, 16], [1, 16], [2, 16], [16]]), st.one_of(shapes, scalars))
near_datatypes = mostly(st.just("INT32"), st.one_of(st.sampled_from(DATATYPES), text(max_size=5)))


@st.composite
def json_input(draw: st.DrawFn, name: str, tail: list[bytes]) -> dict[str, Any]:
    """One input, mostly close to what ``simple`` takes, with its data in the JSON or, as
    Triton's binary extension has it, after the JSON (appended to ``tail``)."""
    item: dict[str, Any] = {
        "name": draw(mostly(st.just(name), st.sampled_from(NAMES))),
        "datatype": draw(near_datatypes),
        "shape": draw(near_shapes),
    }
    how = draw(st.integers(0, 5))
    if how <= 2:
        item["data"] = draw(near_data)
    elif how <= 4:
        raw = draw(
            st.one_of(
                st.binary(min_size=64, max_size=64),
                st.binary(max_size=140),
                st.builds(_framed_bytes, st.lists(st.binary(max_size=6), max_size=20)),
            )
        )
        size = draw(st.one_of(st.just(len(raw)), st.integers(-5, 2**40), scalars))
        item["parameters"] = {"binary_data_size": size}
        tail.append(raw)
        if draw(st.integers(0, 19)) == 19:
            item["data"] = draw(near_data)
    elif draw(st.integers(0, 3)) == 3:
        item["parameters"] = draw(st.one_of(scalars, st.dictionaries(text(max_size=8), scalars)))
    return item


@st.composite
def http_bodies(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """(body, Inference-Header-Content-Length): a JSON header, maybe binary data after it,
    or bytes that are no JSON at all."""
    if draw(st.integers(0, 19)) == 19:
        raw = draw(st.binary(max_size=200))
        return raw, draw(st.one_of(st.none(), st.integers(-2, 300)))
    tail: list[bytes] = []
    document: dict[str, Any] = {}
    if draw(st.integers(0, 19)) != 19:
        names = draw(
            st.one_of(st.just(["INPUT0", "INPUT1"]), st.lists(st.sampled_from(NAMES), max_size=4))
        )
        document["inputs"] = [draw(json_input(name, tail)) for name in names]
    else:
        document["inputs"] = draw(scalars)
    if draw(st.booleans()):
        document["outputs"] = draw(
            st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(NAMES)},
                        optional={
                            "parameters": st.dictionaries(
                                st.sampled_from(["binary_data", "classification", "x"]), scalars
                            )
                        },
                    ),
                    max_size=3,
                ),
                scalars,
            )
        )
    if draw(st.booleans()):
        document["parameters"] = draw(
            mostly(
                st.dictionaries(
                    st.sampled_from(["binary_data_output", "priority", "timeout", "x"]), scalars
                ),
                scalars,
            )
        )
    if draw(st.integers(0, 4)) == 4:
        document["id"] = draw(mostly(text(max_size=4), scalars))
    header = json.dumps(document, allow_nan=True).encode()
    body = header + b"".join(tail)
    length = draw(
        st.one_of(
            st.just(len(header)), st.just(len(header)), st.none(), st.integers(-2, len(body) + 9)
        )
    )
    if not tail and draw(st.booleans()):
        length = None
    return body, length


def _framed_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@st.composite
def grpc_messages(draw: st.DrawFn) -> bytes:
    """A serialised ModelInferRequest with arbitrary tensors, typed and raw contents, or
    bytes that may not parse at all."""
    if draw(st.integers(0, 9)) == 9:
        return draw(st.binary(max_size=200))
    message = pb.ModelInferRequest(
        model_name="simple",
        id=draw(text(max_size=4)),
        model_version=draw(st.sampled_from(["", "1"])),
    )
    names = draw(
        mostly(st.just(["INPUT0", "INPUT1"]), st.lists(st.sampled_from(NAMES), max_size=3))
    )
    raw_mode = draw(st.integers(0, 3))  # 0-1: raw contents, 2: typed, 3: anything
    for name in names:
        tensor = message.inputs.add(name=name, datatype=draw(near_datatypes))
        tensor.shape.extend(
            draw(
                mostly(
                    st.sampled_from([[1, 16], [1, 16], [2, 16]]),
                    st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 4), max_size=4),
                )
            )
        )
        if raw_mode <= 1 or (raw_mode == 3 and draw(st.booleans())):
            message.raw_input_contents.append(
                draw(
                    mostly(
                        st.binary(min_size=64, max_size=64),
                        st.one_of(
                            st.binary(min_size=128, max_size=128),
                            st.binary(max_size=100),
                            st.builds(_framed_bytes, st.lists(st.binary(max_size=6), max_size=20)),
                        ),
                    )
                )
            )
        if raw_mode >= 2:
            kind = draw(st.integers(0, 4))
            if kind == 1:
                tensor.contents.fp32_contents.extend(
                    draw(st.lists(st.floats(width=32), max_size=20))
                )
            elif kind == 2:
                tensor.contents.bytes_contents.extend(
                    draw(st.lists(st.binary(max_size=4), max_size=20))
                )
            elif kind >= 3:
                tensor.contents.int_contents.extend(
                    draw(st.one_of(ints16, st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40)))
                )
        if draw(st.integers(0, 49)) == 49:
            tensor.parameters["shared_memory_region"].string_param = "r"
    for _ in range(draw(st.integers(0, 2))):
        message.outputs.add(name=draw(st.sampled_from(NAMES)))
    if draw(st.booleans()):
        message.parameters["priority"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    return message.SerializeToString()


config_overrides = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["simple", "other", ""]),
        "backend": st.sampled_from(["onnxruntime", "pytorch", "python", "", "../x"]),
        "platform": st.sampled_from(["onnxruntime_onnx", "tensorrt_plan", ""]),
        "max_batch_size": st.integers(-5, 2**31 - 1),
        "default_model_filename": st.sampled_from(
            ["model.onnx", "../../x/model.onnx", "/etc/passwd", "a/b", "..", "", "missing.onnx"]
        ),
        "input": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["INPUT0", "INPUT1", "nope"]),
                    "data_type": st.sampled_from(["TYPE_INT32", "TYPE_FP32", "TYPE_STRING"]),
                    "dims": st.lists(st.integers(-2, 2**40), max_size=3),
                }
            ),
            max_size=3,
        ),
        "output": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["OUTPUT0", "OUTPUT1", "nope"]),
                    "data_type": st.sampled_from(["TYPE_INT32", "TYPE_FP32"]),
                    "dims": st.lists(st.integers(-2, 2**40), max_size=3),
                }
            ),
            max_size=3,
        ),
        "instance_group": st.lists(
            st.fixed_dictionaries(
                {
                    "count": st.integers(0, 2**31 - 1),
                    "kind": st.sampled_from(["KIND_CPU", "KIND_GPU", "KIND_AUTO"]),
                }
            ),
            max_size=2,
        ),
        "dynamic_batching": st.fixed_dictionaries(
            {},
            optional={
                "max_queue_delay_microseconds": st.integers(0, 2**40),
                "preferred_batch_size": st.lists(st.integers(-1, 2**20), max_size=3),
            },
        ),
        "model_warmup": st.lists(
            st.fixed_dictionaries(
                {
                    "name": text(max_size=3),
                    "batch_size": st.integers(0, 2**20),
                    "inputs": st.dictionaries(
                        st.sampled_from(["INPUT0", "INPUT1"]),
                        st.fixed_dictionaries(
                            {
                                "data_type": st.sampled_from(["TYPE_INT32", "TYPE_FP32"]),
                                "dims": st.lists(st.integers(0, 2**40), max_size=3),
                            },
                            optional={
                                "zero_data": st.booleans(),
                                "input_data_file": st.sampled_from(["../../etc/hostname", "x"]),
                            },
                        ),
                        max_size=2,
                    ),
                }
            ),
            max_size=2,
        ),
        "parameters": st.dictionaries(
            st.sampled_from(
                [
                    "engine_calibration",
                    "execution_timeout_us",
                    "inline_execution",
                    "version_weights",
                    "instance_memory_fraction",
                    "engine_profiles",
                ]
            ),
            st.fixed_dictionaries({"string_value": text(max_size=12)}),
            max_size=3,
        ),
    },
)


def client_error(exc: BaseException) -> bool:
    """What a decoder may raise for bad input: the project's own 4xx errors, or protobuf's
    DecodeError (the frontends answer it INVALID_ARGUMENT)."""
    if isinstance(exc, EnginehouseError):
        return exc.http_status < 500
    return isinstance(exc, DecodeError)


def checked(run: Callable[[], object]) -> None:
    """Run one decode; anything but success or a client error fails the property."""
    try:
        run()
    except BaseException as exc:  # the property is exactly what may escape
        if not client_error(exc):
            raise AssertionError(f"{type(exc).__name__} escaped: {exc}") from exc


def simple_version(config_text: str) -> ModelVersion:
    """A ModelVersion of ``simple``'s config without instances: enough to validate requests
    against (nothing here executes)."""
    from google.protobuf import text_format

    config = text_format.Parse(config_text, mc.ModelConfig())
    return ModelVersion(config, 1, scheduler_for(config, "1", InstanceSupervisor("simple", [])))


def decode_http(version: ModelVersion, body: bytes, header_length: int | None) -> None:
    request, _ = http_codec.decode_infer_request("simple", "", body, header_length)
    _validate(version, request)


def decode_grpc(version: ModelVersion, wire: bytes) -> None:
    message = pb.ModelInferRequest.FromString(wire)
    request = grpc_codec.decode_infer_request(message)
    _validate(version, request)
    rest, raw = grpc_codec.split_raw_contents(wire)
    grpc_codec.decode_infer_request(pb.ModelInferRequest.FromString(rest), raw)


def _validate(version: ModelVersion, request: InferRequest) -> None:
    version._check_inputs(request)
    version._output_names(request)


def load_override(location: ModelLocation, document: dict[str, Any]) -> None:
    """The repository API's config override path up to loading: JSON parsed into Triton's
    message (as ServerCore.load_model does), completed and checked against the files."""
    from google.protobuf import json_format

    override = mc.ModelConfig()
    try:
        json_format.Parse(json.dumps(document), override)
    except json_format.ParseError:
        return  # answered 400 "invalid config override" by ServerCore.load_model
    config, _, _ = loader.prepare_config(location, strict=False, override=override)
    loader.execution_timeout_s(config)
    for group in config.instance_group:
        for placement in loader.group_placements(group):
            loader.inline_policy(config, placement)
    loader.memory_fraction(config)


def simple_location(root: Path, model_file: Path) -> ModelLocation:
    folder = root / "simple"
    (folder / "1").mkdir(parents=True, exist_ok=True)
    target = folder / "1" / "model.onnx"
    if not target.exists():
        target.write_bytes(model_file.read_bytes())
    return ModelLocation("simple", root, folder)
