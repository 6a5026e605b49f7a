"""The convolution fusion pass (builder/conv_fusion.py) on exported programs, on the CPU.

cuDNN's fused ops have kernels for CUDA only; here they get CPU kernels written from their
definition (convolution, bias, optional residual, ReLU), so the rewritten graph can be run and
compared with the program as exported. tests/gpu/test_conv_fusion.py runs cuDNN's own."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enginehouse.builder import conv_fusion
from tests.models import torch_residual_convnet

torch = pytest.importorskip("torch")

FUSED = {"aten.cudnn_convolution_relu.default", "aten.cudnn_convolution_add_relu.default"}


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> Iterator[None]:
    library = torch.library.Library("aten", "IMPL", "CPU")

    def relu(x: Any, w: Any, b: Any, stride: Any, padding: Any, dilation: Any, groups: Any) -> Any:
        return torch.relu(torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups))

    def add_relu(
        x: Any, w: Any, z: Any, alpha: Any, b: Any, stride: Any, padding: Any, dilation: Any, g: Any
    ) -> Any:
        conv = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, g)
        return torch.relu(conv + alpha * z)

    library.impl("cudnn_convolution_relu", relu)
    library.impl("cudnn_convolution_add_relu", add_relu)
    yield
    library._destroy()


def _exported(module: Any) -> Any:
    batch = torch.export.Dim("batch", min=1, max=16)
    example = (torch.randn(2, 3, 16, 16),)
    return torch.export.export(module, example, dynamic_shapes=({0: batch},)).module()


def _calls(module: Any) -> list[str]:
    return [str(n.target) for n in module.graph.nodes if n.op == "call_function"]


def _fused_alike(module: Any, image: Any, relus: int, add_relus: int) -> list[str]:
    """Fuse ``module`` in place, check what it now calls and that it answers ``image`` as it
    did; returns its calls."""
    with torch.inference_mode():
        want = module(image)
    assert conv_fusion.fuse(torch, module) == relus + add_relus
    calls = _calls(module)
    assert calls.count("aten.cudnn_convolution_relu.default") == relus
    assert calls.count("aten.cudnn_convolution_add_relu.default") == add_relus
    assert not [c for c in calls if "batch_norm" in c]
    with torch.inference_mode():
        torch.testing.assert_close(module(image), want, rtol=1e-4, atol=1e-5)
    return calls


def test_batch_norms_fold_and_chains_fuse_with_the_same_answers() -> None:
    module = _exported(torch_residual_convnet(8))
    calls = _fused_alike(module, torch.randn(5, 3, 16, 16), relus=2, add_relus=1)
    assert not {"aten.relu.default", "aten.add.Tensor", "aten.conv2d.default"} & set(calls)
    # The statistics and the weights they were folded into are gone; the folded ones stay.
    names = [n for n, _ in (*module.named_parameters(), *module.named_buffers())]
    assert not [n for n in names if "running" in n or "norm" in n]
    assert len([n for n in names if n.startswith("_fused_conv_")]) == 6


def test_a_fused_program_exports_again_with_its_batch_symbolic() -> None:
    module = _exported(torch_residual_convnet(8))
    conv_fusion.fuse(torch, module)
    batch = torch.export.Dim("batch", min=1, max=16)
    again = torch.export.export(module, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    shapes = [
        tuple(str(d) for d in n.meta["val"].shape)
        for n in again.graph.nodes
        if str(n.target) in FUSED
    ]
    assert len(shapes) == 3 and all(s[0] != "2" and s[1:] == ("8", "8", "8") for s in shapes)
    with torch.inference_mode():
        assert again.module()(torch.randn(7, 3, 16, 16)).shape == (7, 10)


def test_an_intermediate_read_twice_is_left_unfused() -> None:
    class Twice(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: Any) -> Any:
            y = self.conv(x)
            return torch.relu(y) + y  # the convolution's output is read beside its ReLU

    module = _exported(Twice().eval())
    assert conv_fusion.fuse(torch, module) == 0
    assert not FUSED & set(_calls(module))
    assert "aten.conv2d.default" in _calls(module)


def test_a_depthwise_convolution_is_left_unfused() -> None:
    depthwise = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1, groups=3), torch.nn.ReLU())
    module = _exported(depthwise.eval())
    assert conv_fusion.fuse(torch, module) == 0
    assert not FUSED & set(_calls(module))


def test_a_broadcast_residual_is_not_taken_for_the_fused_add() -> None:
    class Broadcast(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.shift = torch.nn.Parameter(torch.randn(4, 1, 1))

        def forward(self, x: Any) -> Any:
            return torch.relu(self.conv(x) + self.shift)

    module = _exported(Broadcast().eval())
    image = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        want = module(image)
    assert conv_fusion.fuse(torch, module) == 0
    assert "aten.cudnn_convolution_add_relu.default" not in _calls(module)
    with torch.inference_mode():
        torch.testing.assert_close(module(image), want)


def test_the_builder_keeps_the_fused_program_only_where_it_answers_alike(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from enginehouse.builder import torch_builder

    inner = _exported(torch_residual_convnet(8))
    example = (torch.randn(3, 3, 16, 16),)
    with caplog.at_level(logging.INFO, logger="enginehouse.builder.torch_builder"):
        kept = torch_builder._fuse_convolutions(torch, "net", inner, lambda m: m, example)
        assert kept is not inner and FUSED & set(_calls(kept))
        assert not FUSED & set(_calls(inner))  # fused on a copy
        assert "model 'net': 3 convolutions fused" in caplog.text
        monkeypatch.setattr(torch_builder, "_FUSED_TOLERANCE", -1.0)  # no answer is close
        left = torch_builder._fuse_convolutions(torch, "net", inner, lambda m: m, example)
    assert left is inner
    assert "model 'net': convolutions left as they were (answers differ" in caplog.text


def test_an_onnx_convnet_converted_to_pytorch_is_folded_and_fused(tmp_path: Path) -> None:
    """The converter's forms (functional conv2d with a bias, batch_norm, relu, add) are the
    ones the pass rewrites: a Conv, BatchNormalization, Relu, then a Conv whose output is added
    to that Relu's before a last Relu."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from enginehouse.backends.onnx_to_torch import onnx_module

    rng = np.random.default_rng(3)

    def weight(name: str, *shape: int, low: float = -0.5, high: float = 0.5) -> Any:
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["n1"], epsilon=1e-5
        ),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    initializers = [
        weight("w1", 4, 4, 3, 3),
        weight("b1", 4),
        weight("scale", 4, low=0.5, high=1.5),
        weight("shift", 4),
        weight("mean", 4),
        weight("var", 4, low=0.5, high=2.0),
        weight("w2", 4, 4, 1, 1),
        weight("b2", 4),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializers,
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(  # the converted module takes its inputs as *args
        onnx_module(path, "m"), (torch.randn(2, 4, 8, 8),), dynamic_shapes=(({0: batch},),)
    )
    _fused_alike(program.module(), torch.randn(3, 4, 8, 8), relus=1, add_relus=1)
