"""Reading config.pbtxt into Triton's own ``ModelConfig`` message, and checking it.

The message comes from the generated modules that ``tritonclient`` ships, so every field
Triton accepts parses here. Fields the server does not act on yet are reported once per
model in the log rather than silently ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.config.protojson import is_repeated
from enginehouse.errors import ModelLoadError

log = logging.getLogger(__name__)

ModelConfig = mc.ModelConfig

CONFIG_FILENAME = "config.pbtxt"

ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"

# Fields (dotted paths from the message root) the server acts on; anything else that is set
# is reported. A message field listed here is supported with all its sub-fields.
SUPPORTED_FIELDS = frozenset(
    {
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "version_policy",
        "default_model_filename",
        "parameters",
        "input.name",
        "input.data_type",
        "input.dims",
        "input.reshape",
        "input.optional",
        "input.format",
        "output.name",
        "output.data_type",
        "output.dims",
        "output.reshape",
        "output.label_filename",
        "instance_group.name",
        "instance_group.count",
        "instance_group.kind",
        "instance_group.gpus",
        "dynamic_batching.preferred_batch_size",
        "dynamic_batching.max_queue_delay_microseconds",
        "dynamic_batching.preserve_ordering",
        "dynamic_batching.priority_levels",
        "dynamic_batching.default_priority_level",
        "dynamic_batching.default_queue_policy",
        "dynamic_batching.priority_queue_policy",
        "model_warmup",
    }
)


def parse_config_text(text: str, source: str) -> mc.ModelConfig:
    """Parse config.pbtxt text; a syntax error names the file and the line."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    return config


def read_config(model_dir: Path) -> mc.ModelConfig | None:
    """The parsed config.pbtxt of a model folder, or None when the folder has none."""
    path = model_dir / CONFIG_FILENAME
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return parse_config_text(text, str(path))


def unsupported_fields(config: Message, prefix: str = "") -> list[str]:
    """Dotted paths of the fields that are set but that the server does not act on."""
    found: list[str] = []
    for field, value in config.ListFields():
        path = f"{prefix}{field.name}"
        if path in SUPPORTED_FIELDS:
            continue
        children = [p for p in SUPPORTED_FIELDS if p.startswith(path + ".")]
        if not children or field.message_type is None:
            found.append(path)
            continue
        items = value if is_repeated(field) else [value]
        nested: set[str] = set()
        for item in items:
            nested.update(unsupported_fields(item, path + "."))
        found.extend(sorted(nested))
    return found


_reported: set[tuple[str, str]] = set()


def report_unsupported(config: mc.ModelConfig) -> list[str]:
    """Log each unsupported field of a model once per process; returns them all."""
    fields = unsupported_fields(config)
    for path in fields:
        key = (config.name, path)
        if key not in _reported:
            _reported.add(key)
            log.warning(
                "model '%s': config field '%s' is not supported yet and has no effect",
                config.name,
                path,
            )
    return fields


def validate(config: mc.ModelConfig) -> None:
    """Check what the server relies on: a model that fails here does not load."""
    name = config.name
    if config.max_batch_size < 0:
        raise ModelLoadError(f"model '{name}': max_batch_size must be >= 0")
    if not config.input:
        raise ModelLoadError(f"model '{name}': config declares no inputs")
    if not config.output:
        raise ModelLoadError(f"model '{name}': config declares no outputs")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for tensor in tensors:
            if not tensor.name:
                raise ModelLoadError(f"model '{name}': an {kind} has no name")
            if tensor.name in seen:
                raise ModelLoadError(f"model '{name}': {kind} '{tensor.name}' is declared twice")
            seen.add(tensor.name)
            if tensor.data_type not in datatypes.BY_CONFIG:
                raise ModelLoadError(
                    f"model '{name}': {kind} '{tensor.name}' has unsupported data_type "
                    f"{datatypes.config_type_name(tensor.data_type)}"
                )
            for dim in tensor.dims:
                if dim < -1 or dim == 0:
                    raise ModelLoadError(
                        f"model '{name}': {kind} '{tensor.name}' has invalid dim {dim} "
                        "(dims are positive, or -1 for variable)"
                    )
            if tensor.HasField("reshape"):
                _check_reshape(name, kind, tensor)
    for group in config.instance_group:
        if group.count < 0:
            raise ModelLoadError(f"model '{name}': instance_group count must be >= 0")
    policy = config.version_policy
    if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 1:
        raise ModelLoadError(f"model '{name}': version_policy latest needs num_versions >= 1")


def _check_reshape(model: str, kind: str, tensor: mc.ModelInput | mc.ModelOutput) -> None:
    dims = list(tensor.dims)
    shape = list(tensor.reshape.shape)
    if (-1 in dims) != (-1 in shape):
        raise ModelLoadError(
            f"model '{model}': {kind} '{tensor.name}' reshape {shape} and dims {dims} "
            "must both be fixed or both be variable"
        )
    if -1 not in dims:
        count_dims = 1
        for d in dims:
            count_dims *= d
        count_shape = 1
        for d in shape:
            count_shape *= d
        if count_dims != count_shape:
            raise ModelLoadError(
                f"model '{model}': {kind} '{tensor.name}' reshape {shape} has "
                f"{count_shape} elements, dims {dims} have {count_dims}"
            )


def to_engine_shapes(
    config: mc.ModelConfig, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Client-shaped inputs reshaped to what the model file takes (the inputs' ``reshape``)."""
    batching = config.max_batch_size > 0
    shaped = dict(inputs)
    for tensor in config.input:
        if tensor.HasField("reshape") and tensor.name in shaped:
            array = shaped[tensor.name]
            batch = array.shape[:1] if batching else ()
            shaped[tensor.name] = array.reshape(batch + tuple(tensor.reshape.shape))
    return shaped


def parameter(config: mc.ModelConfig, key: str, default: str = "") -> str:
    """A string value from the config's ``parameters`` map."""
    if key in config.parameters:
        return str(config.parameters[key].string_value)
    return default


def flag_parameter(config: mc.ModelConfig, key: str, default: bool) -> bool:
    """A true/false value from the ``parameters`` map (1/0, yes/no, on/off accepted)."""
    value = parameter(config, key)
    lowered = value.strip().lower()
    if not lowered:
        return default
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ModelLoadError(
        f"model '{config.name}': parameter {key} must be true or false, got '{value}'"
    )
