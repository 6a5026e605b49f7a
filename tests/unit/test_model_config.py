from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.config import autocomplete, model_config
from enginehouse.config.protojson import message_to_json_dict
from enginehouse.errors import ModelLoadError

TRITON_CONFIG = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, -1 ] reshape: { shape: [ -1, 3 ] } } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ 10 ] label_filename: "labels.txt" } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
optimization { graph: { level: 1 } }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [3, 4] zero_data: true } } } ]
"""


def test_every_triton_field_parses() -> None:
    config = model_config.parse_config_text(TRITON_CONFIG, "config.pbtxt")
    assert config.max_batch_size == 8
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert model_config.parameter(config, "intra_op_thread_count") == "1"
    model_config.validate(config)


def test_unsupported_fields_are_listed() -> None:
    config = model_config.parse_config_text(TRITON_CONFIG, "config.pbtxt")
    fields = model_config.unsupported_fields(config)
    assert "optimization" in fields
    assert "dynamic_batching" not in fields and "model_warmup" not in fields
    assert "input.name" not in fields and "instance_group" not in fields


def test_syntax_errors_name_the_file() -> None:
    with pytest.raises(ModelLoadError, match=r"models/m/config\.pbtxt"):
        model_config.parse_config_text("max_batch_size: [", "models/m/config.pbtxt")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'input [{name: "x" data_type: TYPE_FP32 dims: [0]}] output [{name: "y" data_type: TYPE_FP32 dims: [1]}]',
            "invalid dim 0",
        ),
        ('input [{name: "x" data_type: TYPE_FP32 dims: [1]}]', "no outputs"),
        (
            'input [{name: "x" data_type: TYPE_BF16 dims: [1]}] output [{name: "y" data_type: TYPE_FP32 dims: [1]}]',
            "TYPE_BF16",
        ),
        (
            'input [{name: "x" data_type: TYPE_FP32 dims: [4] reshape: {shape: [3]}}] output [{name: "y" data_type: TYPE_FP32 dims: [1]}]',
            "reshape",
        ),
        (
            'input [{name: "x" data_type: TYPE_FP32 dims: [1]}, {name: "x" data_type: TYPE_FP32 dims: [1]}] output [{name: "y" data_type: TYPE_FP32 dims: [1]}]',
            "twice",
        ),
    ],
)
def test_validation_errors(text: str, message: str) -> None:
    config = model_config.parse_config_text('name: "m" ' + text, "c")
    with pytest.raises(ModelLoadError, match=message):
        model_config.validate(config)


def test_json_keeps_int64_as_numbers() -> None:
    config = model_config.parse_config_text(TRITON_CONFIG, "c")
    value = message_to_json_dict(config)
    assert value["input"][0]["dims"] == [3, -1]
    assert value["version_policy"]["specific"]["versions"] == [1, 3]
    assert value["input"][0]["data_type"] == "TYPE_FP32"
    assert value["dynamic_batching"]["max_queue_delay_microseconds"] == 100


def _signature(batch: bool) -> autocomplete.GraphSignature:
    from enginehouse import datatypes

    first = (-1,) if batch else (2,)
    return autocomplete.GraphSignature(
        inputs=(autocomplete.GraphTensor("a", datatypes.BY_NAME["FP32"], (*first, 3)),),
        outputs=(autocomplete.GraphTensor("b", datatypes.BY_NAME["INT64"], (*first, 5)),),
    )


def test_autocomplete_batching_graph() -> None:
    config = autocomplete.complete(mc.ModelConfig(name="m"), _signature(batch=True))
    assert config.max_batch_size == autocomplete.DEFAULT_MAX_BATCH_SIZE
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert list(config.input[0].dims) == [3]
    assert config.output[0].data_type == mc.TYPE_INT64


def test_autocomplete_keeps_what_the_config_says() -> None:
    config = mc.ModelConfig(name="m", max_batch_size=0)
    config.input.add(name="a", data_type=mc.TYPE_FP32, dims=[2, 3])
    completed = autocomplete.complete(config, _signature(batch=True))
    assert completed.max_batch_size == 0
    assert list(completed.output[0].dims) == [-1, 5]


def test_autocomplete_fixed_graph_is_not_batching() -> None:
    config = autocomplete.complete(mc.ModelConfig(name="m"), _signature(batch=False))
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [2, 3]


def test_read_signature_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot read ONNX model"):
        autocomplete.read_signature(path)
