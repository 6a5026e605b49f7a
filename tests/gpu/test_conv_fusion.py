"""Convolutions fused for cuDNN in built GPU engines: the builder folds the batch norms and
fuses the ReLUs and residual adds (builder/conv_fusion.py), keeps the result where its answers
match, and the engine serves those answers with a batch of any size; with
``engine_fuse_convolutions: false`` the convolutions are compiled as they are (skipped
without a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from enginehouse.testing import ServerProcess
from tests.clients import served_and_eager_logits
from tests.models import torch_residual_convnet

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = """backend: "pytorch"
max_batch_size: 16
input [{{ name: "image" data_type: TYPE_FP32 dims: [3, 16, 16] }}]
output [{{ name: "logits" data_type: TYPE_FP32 dims: [10] }}]
instance_group [{{ count: 1 kind: KIND_GPU gpus: [0] }}]
parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}
parameters {{ key: "engine_fuse_convolutions" value: {{ string_value: "{fuse}" }} }}
"""


@pytest.mark.parametrize(("precision", "fuse"), [("fp16", True), ("bf16", True), ("fp16", False)])
def test_a_residual_convnet_is_fused_built_and_served(
    tmp_path: Path, precision: str, fuse: bool
) -> None:
    repo = tmp_path / "repo"
    folder = repo / "residual" / "1"
    folder.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=16)
    module = torch_residual_convnet(16)
    program = torch.export.export(
        module, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(folder / "model.pt2"))
    (repo / "residual" / "config.pbtxt").write_text(
        CONFIG.format(precision=precision, fuse=str(fuse).lower())
    )
    with ServerProcess(
        [repo], "--engine-cache", str(tmp_path / "cache"), log_path=tmp_path / "serve.log"
    ) as server:
        server.wait_live(timeout_s=600)
        fused = "3 convolutions fused with their batch norm, residual add and ReLU"
        assert (fused in server.log()) == fuse, server.log()
        client = httpclient.InferenceServerClient(server.http_url)
        for rows in (1, 5, 16):
            got, want = served_and_eager_logits(client, "residual", module, rows)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= 3e-2 * scale, (precision, rows)
