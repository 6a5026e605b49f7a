"""Inputs the config declares narrower than fp32 travel and stage as declared: an FP16 image
into an fp32 program built as an fp16 engine, and a UINT8 image (a quarter of the bytes)
into a program that scales it itself; served on the GPU with dynamic batching and checked
against the source model; the instance group names no GPUs, so it has an instance on each
(skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from enginehouse.testing import ServerProcess
from tests.clients import infer_all_at_once
from tests.models import torch_convnet

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = """backend: "pytorch"
max_batch_size: 8
input [{{ name: "image" data_type: {dtype} dims: [3, 16, 16] }}]
output [{{ name: "logits" data_type: TYPE_FP32 dims: [10] }}]
instance_group [{{ count: 1 kind: KIND_GPU }}]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}
"""


class ScaledBytes(torch.nn.Module):  # type: ignore[misc]
    """Takes images as bytes, as a camera gives them, and scales them to [0, 1] itself."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch_convnet(16)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image.float() / 255)


def write(
    repo: Path, name: str, module: torch.nn.Module, example: torch.Tensor, **fields: str
) -> None:
    (repo / name / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(repo / name / "1" / "model.pt2"))
    (repo / name / "config.pbtxt").write_text(CONFIG.format(**fields))


def test_fp16_and_uint8_inputs_are_served_as_declared(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    half_net, byte_net = torch_convnet(16), ScaledBytes().eval()
    write(repo, "half_in", half_net, torch.randn(2, 3, 16, 16), dtype="TYPE_FP16", precision="fp16")
    write(
        repo,
        "bytes_in",
        byte_net,
        torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
        dtype="TYPE_UINT8",
        precision="fp32",
    )
    rng = np.random.default_rng(0)
    with ServerProcess(
        [repo], "--engine-cache", str(tmp_path / "cache"), log_path=tmp_path / "serve.log"
    ) as server:
        server.wait_live(timeout_s=900)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for name, module, dtype, tolerance in (
            ("half_in", half_net, np.float16, 1e-2),
            ("bytes_in", byte_net, np.uint8, 1e-4),
        ):
            assert client.is_model_ready(name), server.log()
            if dtype is np.uint8:
                images = [
                    rng.integers(0, 256, (rows, 3, 16, 16)).astype(np.uint8)
                    for rows in (1, 3, 2, 1)
                ]
            else:
                images = [
                    rng.standard_normal((rows, 3, 16, 16)).astype(np.float16)
                    for rows in (1, 3, 2, 1)
                ]
            answers = infer_all_at_once(client, name, "image", images)
            for image, got in zip(images, answers):
                source = torch.from_numpy(image if dtype is np.uint8 else image.astype(np.float32))
                with torch.no_grad():
                    want = module(source).numpy()
                assert got.shape == want.shape
                assert np.abs(got - want).max() / np.abs(want).max() <= tolerance, name
            metadata = client.get_model_metadata(name)
            assert metadata.inputs[0].datatype == ("FP16" if dtype is np.float16 else "UINT8")
            # The group names no GPUs: one instance on each GPU the server sees.
            group = client.get_model_config(name).config.instance_group[0]
            assert list(group.gpus) == list(range(torch.cuda.device_count()))
