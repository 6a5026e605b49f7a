"""Completing a model's config from its ONNX graph, as tritonserver does.

Without ``--strict-model-config`` a model folder may omit config.pbtxt, or leave out
inputs, outputs or max_batch_size; the graph says what they are. A graph whose inputs and
outputs all have a variable first dimension is a batching model, and gets Triton's
default max_batch_size of 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.config.model_config import ONNX_BACKEND, ONNX_PLATFORM
from enginehouse.errors import ModelLoadError

DEFAULT_MAX_BATCH_SIZE = 4


@dataclass(frozen=True, slots=True)
class GraphTensor:
    """An input or output of an ONNX graph: its name, datatype and shape (-1 = variable)."""

    name: str
    datatype: datatypes.DataType
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GraphSignature:
    """The inputs and outputs an ONNX graph declares."""

    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    @property
    def batchable(self) -> bool:
        """Every input and output has a variable first dimension."""
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


def read_signature(model_path: Path) -> GraphSignature:
    """The graph inputs (initializers excluded) and outputs of an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ModelLoadError(f"cannot read ONNX model {model_path}: {exc}") from None
    initializers = {init.name for init in model.graph.initializer}

    def tensors(values: list[onnx.ValueInfoProto], kind: str) -> tuple[GraphTensor, ...]:
        found = []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dtype = datatypes.BY_ONNX.get(tensor_type.elem_type)
            if dtype is None:
                raise ModelLoadError(
                    f"{model_path}: {kind} '{value.name}' has ONNX element type "
                    f"{tensor_type.elem_type}, which the server does not support"
                )
            shape = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                for d in tensor_type.shape.dim
            )
            found.append(GraphTensor(value.name, dtype, shape))
        return tuple(found)

    return GraphSignature(
        tensors(model.graph.input, "input"), tensors(model.graph.output, "output")
    )


def complete(config: mc.ModelConfig, signature: GraphSignature) -> mc.ModelConfig:
    """Fill in what the config leaves out; what it states is kept as written."""
    if not config.platform and not config.backend:
        config.platform = ONNX_PLATFORM
    if config.platform == ONNX_PLATFORM and not config.backend:
        config.backend = ONNX_BACKEND
    if config.backend == ONNX_BACKEND and not config.platform:
        config.platform = ONNX_PLATFORM
    declares_tensors = bool(config.input) or bool(config.output)
    if not declares_tensors and config.max_batch_size == 0 and signature.batchable:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    skip = 1 if config.max_batch_size > 0 else 0
    for declared, found in ((config.input, signature.inputs), (config.output, signature.outputs)):
        if declared:
            continue
        for tensor in found:
            item = declared.add()
            item.name = tensor.name
            item.data_type = tensor.datatype.config_type  # type: ignore[assignment]
            item.dims.extend(tensor.shape[skip:])
    return config
