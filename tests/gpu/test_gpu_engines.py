"""PyTorch engines on the GPU: CUDA graphs per bucket, precision, memory-sized pools, OOM and
unload (skipped without a GPU)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from enginehouse.testing import ServerProcess
from tests.clients import infer_all_at_once
from tests.models import torch_convnet

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = """backend: "pytorch"
max_batch_size: {max_batch}
input [{{ name: "image" data_type: TYPE_FP32 dims: [3, 16, 16] }}]
output [{{ name: "logits" data_type: TYPE_FP32 dims: [10] }}]
instance_group [{{ count: 2 kind: KIND_GPU gpus: [0] }}]
parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}
{extra}
"""


def net() -> torch.nn.Module:
    return torch_convnet(16)


def write(repo: Path, name: str, precision: str, max_batch: int = 8, extra: str = "") -> None:
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(net(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    (repo / name / "config.pbtxt").write_text(
        CONFIG.format(max_batch=max_batch, precision=precision, extra=extra)
    )


def metrics(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def test_gpu_engines_serve_with_graphs_and_sized_pools(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo, "gpu_fp16", "fp16")
    write(repo, "gpu_bf16", "bf16", extra="dynamic_batching { max_queue_delay_microseconds: 500 }")
    write(
        repo,
        "gpu_sized",
        "fp32",
        extra='parameters { key: "instance_memory_fraction" value: { string_value: "0.02" } }',
    )
    # Static input buffers for a 2^26 batch of 3x16x16 floats take 192 GiB: more than any
    # GPU has. That model fails with a clear error; the others serve.
    write(
        repo,
        "gpu_oom",
        "fp32",
        max_batch=1 << 26,
        extra='parameters { key: "cuda_graph_batch_buckets" value: { string_value: "67108864" } }\n'
        'parameters { key: "engine_build" value: { string_value: "false" } }',
    )
    with ServerProcess(
        [repo], "--engine-cache", str(tmp_path / "cache"), log_path=tmp_path / "serve.log"
    ) as server:
        server.wait_live(timeout_s=900)
        client = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        log = server.log()
        for name, tolerance in (("gpu_fp16", 1e-2), ("gpu_bf16", 5e-2), ("gpu_sized", 1e-4)):
            assert client.is_model_ready(name), log
            for rows in (1, 3, 8):  # 3 pads up to the bucket of 4
                image = np.random.default_rng(rows).standard_normal((rows, 3, 16, 16))
                image = image.astype(np.float32)
                with torch.no_grad():
                    want = net()(torch.from_numpy(image)).numpy()
                item = grpcclient.InferInput("image", list(image.shape), "FP32")
                item.set_data_from_numpy(image)
                got = grpc.infer(name, [item]).as_numpy("logits")
                assert got.shape == (rows, 10)
                assert np.abs(got - want).max() / np.abs(want).max() <= tolerance, name

        # Concurrent requests to the batching model run together: each one's rows are
        # gathered straight into the pinned staging buffers, and each gets its own back.
        images = [
            np.random.default_rng(10 + i).standard_normal((rows, 3, 16, 16)).astype(np.float32)
            for i, rows in enumerate((1, 2, 3, 1, 2, 1, 4, 1))
        ]
        before = grpc.get_inference_statistics("gpu_bf16").model_stats[0]
        answers = infer_all_at_once(grpc, "gpu_bf16", "image", images)
        for image, got in zip(images, answers):
            with torch.no_grad():
                want = net()(torch.from_numpy(image)).numpy()
            assert np.abs(got - want).max() / np.abs(want).max() <= 5e-2
        after = grpc.get_inference_statistics("gpu_bf16").model_stats[0]
        requests = after.inference_stats.success.count - before.inference_stats.success.count
        assert requests == len(images)
        assert after.execution_count - before.execution_count < requests, after

        # Standalone Inductor artefacts: loaded, not traced and compiled again.
        manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("manifest.json")]
        assert {m["artefact"] for m in manifests} == {"inductor.art"}, manifests
        for name in ("gpu_fp16", "gpu_bf16", "gpu_sized"):
            assert f"model '{name}': engine loaded onto cuda:0" in server.log(), server.log()

        assert not client.is_model_ready("gpu_oom")
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert "out of GPU memory" in index["gpu_oom"]["reason"], index["gpu_oom"]

        sized = re.search(r"one instance takes ([\d.]+) MiB on gpu:0; (\d+) instances fit", log)
        assert sized, log
        count = int(sized.group(2))
        config = client.get_model_config("gpu_sized")
        assert config["instance_group"][0]["count"] == count
        text = metrics(server)
        assert re.search(
            r'enginehouse_instance_memory_bytes\{device="gpu:0",model="gpu_sized",version="1"\} [1-9]',
            text,
        ), text
        assert (
            f'enginehouse_instances{{model="gpu_sized",state="idle",version="1"}} {float(count)}'
            in text
        )


def test_unload_returns_device_memory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo, "gpu_model", "fp32", max_batch=4096)
    with ServerProcess(
        [repo],
        "--model-control-mode",
        "explicit",
        "--engine-cache",
        str(tmp_path / "cache"),
        log_path=tmp_path / "serve.log",
    ) as server:
        server.wait_live(timeout_s=900)
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=900)
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def used() -> int:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            return sum(p.usedGpuMemory or 0 for p in processes if p.pid == server.process.pid)

        client.load_model("gpu_model")  # CUDA context, kernels, allocator: the baseline
        client.unload_model("gpu_model")
        before = used()
        client.load_model("gpu_model")
        loaded = used()
        client.unload_model("gpu_model")
        after = used()
        mib = 1 << 20
        print(
            f"device memory: before {before / mib:.0f} MiB, loaded {loaded / mib:.0f}, after {after / mib:.0f}"
        )
        assert loaded - before > 64 * mib  # two instances' graphs and buffers for 4096 rows
        assert after - before < 16 * mib
        with pytest.raises(InferenceServerException):
            client.infer("gpu_model", [])


class Encoder(torch.nn.Module):
    """A small transformer encoder: linear layers big enough for int8 / fp8 to apply."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
        self.head = torch.nn.Linear(256, 64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(tokens).mean(dim=1))


ENCODER_CONFIG = """backend: "pytorch"
max_batch_size: 16
input [{{ name: "tokens" data_type: TYPE_FP32 dims: [32, 256] }}]
output [{{ name: "embedding" data_type: TYPE_FP32 dims: [64] }}]
instance_group [{{ count: 1 kind: KIND_GPU }}]
parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}
parameters {{ key: "engine_calibration_random_samples" value: {{ string_value: "4" }} }}
"""


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_engines_serve_within_tolerance(tmp_path: Path, precision: str) -> None:
    pytest.importorskip("torchao")
    if precision == "fp8" and torch.cuda.get_device_capability(0) < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    repo = tmp_path / "repo"
    folder = repo / "encoder" / "1"
    folder.mkdir(parents=True)
    model = Encoder().eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (torch.randn(2, 32, 256),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    (repo / "encoder" / "config.pbtxt").write_text(ENCODER_CONFIG.format(precision=precision))
    cache = tmp_path / "cache"
    with ServerProcess([repo], "--engine-cache", str(cache), log_path=tmp_path / "s.log") as server:
        server.wait_ready(timeout_s=600)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        tokens = np.random.default_rng(1).standard_normal((5, 32, 256)).astype(np.float32)
        item = grpcclient.InferInput("tokens", list(tokens.shape), "FP32")
        item.set_data_from_numpy(tokens)
        got = client.infer("encoder", [item]).as_numpy("embedding")
        with torch.inference_mode():
            want = model(torch.from_numpy(tokens)).numpy()
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.99, cosine
        assert np.abs(got - want).max() > 0  # quantised, not the fp32 program
    log = (tmp_path / "s.log").read_text()
    assert f"linear layers quantised to {precision}" in log
    manifests = [json.loads(p.read_text()) for p in cache.rglob("manifest.json")]
    assert [m["precision"] for m in manifests] == [precision]
