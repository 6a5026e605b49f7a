"""Write an example Triton model repository of ONNX models.

Models:
- ``simple``: Triton's quick-start model. INT32 INPUT0, INPUT1 [16] -> OUTPUT0 = sum,
  OUTPUT1 = difference; max_batch_size 8.
- ``identity_<type>``: one batching identity model per datatype (BOOL ... FP64, BYTES).
- ``simple_nobatch``: ``simple`` without a batch dimension (max_batch_size 0).
- ``convnet``: a small convolution net defined in PyTorch, exported to ONNX, with no
  config.pbtxt (the server completes it from the graph); only where PyTorch is installed.

Usage: python examples/make_repository.py DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8

IDENTITY_TYPES = {
    "bool": ("TYPE_BOOL", TensorProto.BOOL),
    "uint8": ("TYPE_UINT8", TensorProto.UINT8),
    "uint16": ("TYPE_UINT16", TensorProto.UINT16),
    "uint32": ("TYPE_UINT32", TensorProto.UINT32),
    "uint64": ("TYPE_UINT64", TensorProto.UINT64),
    "int8": ("TYPE_INT8", TensorProto.INT8),
    "int16": ("TYPE_INT16", TensorProto.INT16),
    "int32": ("TYPE_INT32", TensorProto.INT32),
    "int64": ("TYPE_INT64", TensorProto.INT64),
    "fp16": ("TYPE_FP16", TensorProto.FLOAT16),
    "fp32": ("TYPE_FP32", TensorProto.FLOAT),
    "fp64": ("TYPE_FP64", TensorProto.DOUBLE),
    "bytes": ("TYPE_STRING", TensorProto.STRING),
}


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def simple_model(batch: bool) -> onnx.ModelProto:
    """INT32 add/sub of two [16] tensors, with or without a leading batch dimension."""
    shape: list[int | str] = ["batch", 16] if batch else [16]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    graph = helper.make_graph(nodes, "simple", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


SIMPLE_CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }},
  {{ name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }},
  {{ name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def identity_model(elem_type: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", elem_type, ["batch", -1])],
        [helper.make_tensor_value_info("OUTPUT0", elem_type, ["batch", -1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


IDENTITY_CONFIG = """name: "{name}"
backend: "onnxruntime"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: {dtype} dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: {dtype} dims: [ -1 ] }} ]
"""


def export_convnet(path: Path) -> None:
    """A small image classifier defined in PyTorch, exported to ONNX with a dynamic batch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, 3, 32, 32)
    # The TorchScript exporter needs no extra packages; it warns that it is the legacy path.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def make_repository(root: Path, with_torch: bool | None = None) -> Path:
    """Write every example model under ``root``; returns ``root``. The PyTorch-exported
    ``convnet`` is written when PyTorch is installed (``with_torch=None``) or asked for."""
    if with_torch is None:
        with_torch = importlib.util.find_spec("torch") is not None
    root.mkdir(parents=True, exist_ok=True)
    _save(simple_model(batch=True), root / "simple" / "1" / "model.onnx")
    _write(root / "simple" / "config.pbtxt", SIMPLE_CONFIG.format(name="simple", max_batch=8))
    _save(simple_model(batch=False), root / "simple_nobatch" / "1" / "model.onnx")
    _write(
        root / "simple_nobatch" / "config.pbtxt",
        SIMPLE_CONFIG.format(name="simple_nobatch", max_batch=0),
    )
    for suffix, (config_type, elem_type) in IDENTITY_TYPES.items():
        name = f"identity_{suffix}"
        _save(identity_model(elem_type), root / name / "1" / "model.onnx")
        _write(root / name / "config.pbtxt", IDENTITY_CONFIG.format(name=name, dtype=config_type))
    if with_torch:
        export_convnet(root / "convnet" / "1" / "model.onnx")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--no-torch",
        action="store_true",
        help="skip the PyTorch-exported model (skipped anyway without PyTorch)",
    )
    args = parser.parse_args(argv)
    make_repository(args.directory, with_torch=False if args.no_torch else None)
    print(f"example model repository written to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
