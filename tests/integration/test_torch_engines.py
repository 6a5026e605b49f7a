"""PyTorch sources (torch.export programs) built into AOTInductor engines and served on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import ServerProcess

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
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()


def export_program(path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(net(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


def test_exported_program_built_and_served(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name, precision in (("torch_fp32", "fp32"), ("torch_bf16", "bf16")):
        export_program(repo / name / "1" / "model.pt2")
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, precision=precision))
    server = ServerProcess(
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


def test_torchscript_source_is_frozen_and_served(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = repo / "scripted"
    (model_dir / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(net()), str(model_dir / "1" / "model.pt"))
    (model_dir / "config.pbtxt").write_text(
        CONFIG.format(name="scripted", precision="fp32") + 'default_model_filename: "model.pt"\n'
    )
    server = ServerProcess(
        [repo], "--engine-cache", str(tmp_path / "cache"), log_path=tmp_path / "serve.log"
    )
    try:
        server.wait_live(timeout_s=600)
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("scripted"), server.log()
        image = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
        item = httpclient.InferInput("image", list(image.shape), "FP32")
        item.set_data_from_numpy(image)
        with torch.no_grad():
            reference = net()(torch.from_numpy(image)).numpy()
        logits = client.infer("scripted", [item]).as_numpy("logits")
        assert np.abs(logits - reference).max() / np.abs(reference).max() <= 1e-4
        assert "building pytorch fp32 engine" in server.log()
    finally:
        server.stop()
