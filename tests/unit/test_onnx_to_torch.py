"""The ONNX-to-PyTorch converter against ONNX Runtime, eagerly and under torch.export."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginehouse.backends.onnx_to_torch import onnx_module
from enginehouse.config.autocomplete import read_signature
from enginehouse.errors import ModelLoadError

torch = pytest.importorskip("torch")


def int_constant(name: str, values: list[int] | int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def shape_arithmetic_model() -> onnx.ModelProto:
    """What exporters write for ``x.reshape(batch, 2, 2)``, ``expand`` and ``arange``: sizes
    read with Shape and Gather, combined with Concat, Equal/Where, ConstantOfShape, Range."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["width"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "two_two"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["square"]),
        helper.make_node(
            "ConstantOfShape",
            ["three"],
            ["ones"],
            value=helper.make_tensor("v", TensorProto.INT64, [1], [1]),
        ),
        helper.make_node("Mul", ["ones", "minus_one"], ["minus_ones"]),
        helper.make_node("Equal", ["expand_to", "minus_ones"], ["is_keep"]),
        helper.make_node("Where", ["is_keep", "ones", "expand_to"], ["expand_shape"]),
        helper.make_node("Expand", ["bias", "expand_shape"], ["bias_wide"]),
        helper.make_node("Add", ["square", "bias_wide"], ["biased"]),
        helper.make_node("Range", ["start", "width", "step"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["positions_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["positions_f"], ["total"], keepdims=0),
        helper.make_node("Mul", ["biased", "total"], ["y"]),
    ]
    initializers = [
        int_constant("zero", 0),
        int_constant("one", 1),
        int_constant("axes0", [0]),
        int_constant("two_two", [2, 2]),
        int_constant("three", [3]),
        int_constant("minus_one", -1),
        int_constant("expand_to", [-1, 2, 2]),
        int_constant("start", 0),
        int_constant("step", 1),
        numpy_helper.from_array(np.array([[[0.5, -1.0]]], dtype=np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 2])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_arithmetic_matches_onnxruntime_and_exports_dynamic(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(shape_arithmetic_model(), str(path))
    signature = read_signature(path)
    assert [len(signature.inputs), len(signature.outputs)] == [1, 1]
    session = ort.InferenceSession(str(path))
    module = onnx_module(path, "m")
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(module, (torch.zeros(2, 4),), dynamic_shapes=(({0: batch},),))
    for rows in (1, 3, 7):  # sizes the trace did not see
        x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
        (want,) = session.run(None, {"x": x})
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(program.module()(torch.from_numpy(x)).numpy(), want, rtol=1e-6)


def test_unreadable_and_unsupported_models_name_the_cause(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(
        ModelLoadError, match=re.escape("model 'm': cannot read ONNX model broken.onnx")
    ):
        onnx_module(broken, "m")
    graph = helper.make_graph(
        [helper.make_node("Custom", ["x"], ["y"], domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    custom = tmp_path / "custom.onnx"
    onnx.save(
        helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
        ),
        str(custom),
    )
    with pytest.raises(
        ModelLoadError, match=re.escape("does not support operator(s) com.example.Custom")
    ):
        onnx_module(custom, "m")
