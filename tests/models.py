"""Small ONNX models that tests write into their own repositories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.rollout import scale_model


def save(model: onnx.ModelProto, root: Path, name: str, config: str) -> None:
    model.ir_version = 8
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, str(root / name / "1" / "model.onnx"))
    (root / name / "config.pbtxt").write_text(config)


def matmul_chain(layers: int = 40, width: int = 1024) -> onnx.ModelProto:
    """MatMul+Tanh layers: tens of milliseconds per request of a few rows on a CPU."""
    weight = numpy_helper.from_array(
        (np.random.default_rng(0).standard_normal((width, width)) / np.sqrt(width)).astype(
            np.float32
        ),
        "W",
    )
    nodes = []
    current = "INPUT0"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [current, "W"], [f"m{i}"]))
        current = f"t{i}" if i < layers - 1 else "OUTPUT0"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [current]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def scale_by_two(width: int = 4) -> onnx.ModelProto:
    """OUTPUT0 = 2 * INPUT0 for FP32 [batch, width]; each row says which request it was."""
    return scale_model(2, width)


def gather_table() -> onnx.ModelProto:
    """OUTPUT0 = TABLE[INDEX]; an index outside 0..3 makes ONNX Runtime fail the run."""
    table = numpy_helper.from_array(np.array([10, 20, 30, 40], np.float32), "TABLE")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["TABLE", "INDEX"], ["OUTPUT0"])],
        "gather",
        [helper.make_tensor_value_info("INDEX", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 1])],
        initializer=[table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def first_rows(rows: int, width: int = 4) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0[:rows]: a broken batching model that drops rows past ``rows``."""
    starts, ends, axes = (
        numpy_helper.from_array(np.array([v], np.int64), n)
        for n, v in (("starts", 0), ("ends", rows), ("axes", 0))
    )
    graph = helper.make_graph(
        [helper.make_node("Slice", ["INPUT0", "starts", "ends", "axes"], ["OUTPUT0"])],
        "first_rows",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["rows", width])],
        initializer=[starts, ends, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def total_sum(width: int = 4) -> onnx.ModelProto:
    """OUTPUT0 = sum of the whole batch: a scalar, though the graph declares [batch, 1]."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["INPUT0"], ["OUTPUT0"], keepdims=0)],
        "total_sum",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def chain_config(extra: str = "", count: int = 1, width: int = 1024) -> str:
    return (
        'backend: "onnxruntime"\nmax_batch_size: 64\n'
        f'input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [{width}] }}]\n'
        f'output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [{width}] }}]\n'
        f"instance_group [{{ count: {count} kind: KIND_CPU }}]\n"
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n' + extra
    )


def torch_convnet(width: int) -> Any:
    """A seeded PyTorch classifier for 3x16x16 images: conv, ReLU, global pool, 10 logits."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(width, 10),
    ).eval()


def torch_residual_convnet(width: int) -> Any:
    """A seeded PyTorch classifier for 3x16x16 images built as ResNet's blocks are: a stem
    convolution, batch norm and ReLU, then a block of two such convolutions whose second
    output is added to the block's input before its ReLU; global pool, 10 logits. Its batch
    norms carry statistics of their own, so folding them changes the weights."""
    import torch

    class Block(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.norm1 = torch.nn.BatchNorm2d(width)
            self.conv2 = torch.nn.Conv2d(width, width, 1)
            self.norm2 = torch.nn.BatchNorm2d(width)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.norm1(self.conv1(x)))
            return torch.relu(self.norm2(self.conv2(y)) + x)

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(width),
        torch.nn.ReLU(),
        Block(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(width, 10),
    ).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net


def loop_model(batch: bool = False) -> onnx.ModelProto:
    """OUTPUT0 = 1 added COUNT times (the largest COUNT of the batch), in every row: a model
    that runs as long as a request asks, for hung executions and for holding an instance
    busy for a known time."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["x_in", "one"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    shape: list[int | str] = ["batch", 1] if batch else [1]
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["COUNT"], ["trips"], keepdims=0),
            helper.make_node("Loop", ["trips", "cond", "zero"], ["total"], body=body),
            helper.make_node("Cast", ["COUNT"], ["count"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["count", "zero"], ["rows"]),
            helper.make_node("Add", ["rows", "total"], ["OUTPUT0"]),
        ],
        "loop",
        [helper.make_tensor_value_info("COUNT", TensorProto.INT64, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape)],
        initializer=[
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
