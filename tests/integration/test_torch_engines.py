"""PyTorch sources (torch.export programs) built into AOTInductor engines and served on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import InProcessServer
from tests.models import torch_convnet

torch = pytest.importorskip("torch")

CONFIG = """name: "{name}"
backend: "pytorch"
max_batch_size: 8
input [{{ name: "image" data_type: TYPE_FP32 dims: [3, 16, 16] }}]
output [{{ name: "logits" data_type: TYPE_FP32 dims: [10] }}]
instance_group [{{ count: 1 kind: KIND_CPU }}]
parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}
"""


def net() -> torch.nn.Module:
    return torch_convnet(8)


def export_program(path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(net(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


@pytest.mark.slow
def test_exported_program_built_and_served(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name, precision in (("torch_fp32", "fp32"), ("torch_bf16", "bf16")):
        export_program(repo / name / "1" / "model.pt2")
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, precision=precision))
    server = InProcessServer(
        [repo], "--engine-cache", str(tmp_path / "cache"), log_path=tmp_path / "serve.log"
    )
    try:
        server.wait_live(timeout_s=900)
        client = httpclient.InferenceServerClient(server.http_url)
        image = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
        with torch.no_grad():
            reference = net()(torch.from_numpy(image)).numpy()
        for name, tolerance in (("torch_fp32", 1e-4), ("torch_bf16", 5e-2)):
            assert client.is_model_ready(name), server.log()
            item = httpclient.InferInput("image", list(image.shape), "FP32")
            item.set_data_from_numpy(image)
            logits = client.infer(name, [item]).as_numpy("logits")
            assert logits.shape == (3, 10)
            assert np.abs(logits - reference).max() / np.abs(reference).max() <= tolerance, name
        assert server.log().count("building pytorch") == 2
    finally:
        server.stop()


# A TorchScript model as Triton's documentation writes its repository: platform
# pytorch_libtorch, 1/model.pt, INPUT__0 / OUTPUT__0, no default_model_filename.
TRITON_TORCHSCRIPT = """name: "scripted"
platform: "pytorch_libtorch"
max_batch_size: 8
input [{ name: "INPUT__0" data_type: TYPE_FP32 dims: [3, 16, 16] }]
output [{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [10] }]
instance_group [{ count: 2 kind: KIND_CPU }]
dynamic_batching { preferred_batch_size: [2, 4] max_queue_delay_microseconds: 500 }
"""


def test_torchscript_source_is_frozen_and_served(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = repo / "scripted"
    (model_dir / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(net()), str(model_dir / "1" / "model.pt"))
    (model_dir / "config.pbtxt").write_text(TRITON_TORCHSCRIPT)
    server = InProcessServer(
        [repo], "--engine-cache", str(tmp_path / "cache"), log_path=tmp_path / "serve.log"
    )
    try:
        server.wait_live(timeout_s=600)
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("scripted"), server.log()
        image = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
        item = httpclient.InferInput("INPUT__0", list(image.shape), "FP32")
        item.set_data_from_numpy(image)
        with torch.no_grad():
            reference = net()(torch.from_numpy(image)).numpy()
        logits = client.infer("scripted", [item]).as_numpy("OUTPUT__0")
        assert np.abs(logits - reference).max() / np.abs(reference).max() <= 1e-4
        assert "building pytorch fp32 engine" in server.log()
        assert "Warning" not in server.log()
    finally:
        server.stop()


class TinyEncoder(torch.nn.Module):
    """Self-attention written with sizes read from the input, as exporters see real
    transformers: Shape/Gather/Concat/Reshape chains, Softmax, LayerNorm, GELU (Erf)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.ff = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        q, k, v = self.qkv(tokens).reshape(batch, length, 3, 2, width // 2).unbind(2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / (width // 2) ** 0.5
        mixed = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, length, -1)
        hidden = self.norm(tokens + self.out(mixed))
        return self.ff(hidden).mean(dim=1)


ONNX_CONFIG = """name: "{name}"
backend: "pytorch"
default_model_filename: "model.onnx"
max_batch_size: 8
input [{{ name: "{input}" data_type: TYPE_FP32 dims: {dims} }}]
output [{{ name: "{output}" data_type: TYPE_FP32 dims: [{width}] }}]
instance_group [{{ count: 1 kind: KIND_CPU }}]
parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}
"""


def export_onnx(
    module: torch.nn.Module, example: torch.Tensor, path: Path, names: tuple[str, str]
) -> None:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[names[0]],
        output_names=[names[1]],
        dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


@pytest.mark.slow
def test_onnx_sources_convert_build_and_serve(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    repo = tmp_path / "repo"
    cases = {
        "onnx_conv_fp32": (
            net(),
            torch.randn(2, 3, 16, 16),
            ("image", "logits"),
            "[3, 16, 16]",
            10,
            "fp32",
        ),
        "onnx_conv_bf16": (
            net(),
            torch.randn(2, 3, 16, 16),
            ("image", "logits"),
            "[3, 16, 16]",
            10,
            "bf16",
        ),
        "onnx_attention": (
            TinyEncoder().eval(),
            torch.randn(2, 6, 16),
            ("tokens", "scores"),
            "[6, 16]",
            4,
            "fp32",
        ),
    }
    for name, (module, example, names, dims, width, precision) in cases.items():
        export_onnx(module, example, repo / name / "1" / "model.onnx", names)
        (repo / name / "config.pbtxt").write_text(
            ONNX_CONFIG.format(
                name=name,
                input=names[0],
                output=names[1],
                dims=dims,
                width=width,
                precision=precision,
            )
        )
    # An operator the converter does not know: that model fails, naming it; the rest serve.
    graph = helper.make_graph(
        [helper.make_node("Hardmax", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
    )
    (repo / "onnx_unsupported" / "1").mkdir(parents=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(repo / "onnx_unsupported" / "1" / "model.onnx"),
    )
    (repo / "onnx_unsupported" / "config.pbtxt").write_text(
        ONNX_CONFIG.format(
            name="onnx_unsupported", input="x", output="y", dims="[4]", width=4, precision="fp32"
        )
    )
    server = InProcessServer(
        [repo], "--engine-cache", str(tmp_path / "cache"), log_path=tmp_path / "serve.log"
    )
    try:
        server.wait_live(timeout_s=900)
        client = httpclient.InferenceServerClient(server.http_url)
        rng = np.random.default_rng(3)
        for name, (module, example, names, _, _, precision) in cases.items():
            assert client.is_model_ready(name), server.log()
            data = rng.standard_normal((5, *example.shape[1:])).astype(np.float32)  # not 2 rows
            item = httpclient.InferInput(names[0], list(data.shape), "FP32")
            item.set_data_from_numpy(data)
            got = client.infer(name, [item]).as_numpy(names[1])
            with torch.no_grad():
                want = module(torch.from_numpy(data)).numpy()
            tolerance = 1e-4 if precision == "fp32" else 5e-2
            assert np.abs(got - want).max() / np.abs(want).max() <= tolerance, name
        assert not client.is_model_ready("onnx_unsupported")
        assert "does not support operator(s) Hardmax" in server.log()
        assert server.log().count("building pytorch") == 4
    finally:
        server.stop()
