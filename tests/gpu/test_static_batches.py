"""Fixed-batch PyTorch engines beside the one of symbolic batch: measured by the builder on
the GPU, kept or not by what it measured, and served from the engine cache (skipped without
a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from enginehouse.backends import inductor_artifact
from enginehouse.builder import artifacts, static_batches
from enginehouse.builder.cache import EngineCache
from enginehouse.core import loader
from enginehouse.repository import ModelRepository
from enginehouse.testing import ServerProcess
from tests.clients import served_and_eager_logits
from tests.models import torch_convnet

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = """backend: "pytorch"
max_batch_size: 16
input [{ name: "image" data_type: TYPE_FP32 dims: [3, 16, 16] }]
output [{ name: "logits" data_type: TYPE_FP32 dims: [10] }]
instance_group [{ count: 1 kind: KIND_GPU gpus: [0] }]
parameters { key: "engine_precision" value: { string_value: "fp16" } }
parameters { key: "engine_static_batch_sizes" value: { string_value: "12" } }
"""


Index = dict[str, dict[str, dict[str, float | str]]]


def _built(tmp_path: Path) -> tuple[Path, Path, Path, Index]:
    """Build the convnet with a fixed-batch engine for 12 rows: (repository, engine cache,
    the engine's folder, its index of fixed-batch engines)."""
    repo = tmp_path / "repo"
    folder = repo / "fixed" / "1"
    folder.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(
        torch_convnet(16), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(folder / "model.pt2"))
    (repo / "fixed" / "config.pbtxt").write_text(CONFIG)
    location = ModelRepository([repo]).locate("fixed")
    config, backend, files = loader.prepare_config(location, strict=False)
    cache = tmp_path / "cache"
    built = artifacts.prepare(
        config, backend.name, 1, files[1], location.path, EngineCache(cache), "cuda:0"
    )
    folder = built.path.parent
    return repo, cache, folder, json.loads((folder / inductor_artifact.STATIC_INDEX).read_text())


def test_a_kept_fixed_batch_engine_is_served_for_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(static_batches, "MIN_GAIN", -1e9)  # kept, whatever it measures
    repo, cache, folder, index = _built(tmp_path)
    facts = index["kept"]["12"]
    assert float(facts["symbolic_ms"]) > 0 and float(facts["static_ms"]) > 0
    assert float(facts["build_s"]) > 0 and float(facts["relative_difference"]) < 1e-2
    assert (folder / inductor_artifact.static_name(12)).is_file()

    module = torch_convnet(16)
    with ServerProcess(
        [repo], "--engine-cache", str(cache), log_path=tmp_path / "serve.log"
    ) as server:
        server.wait_live(timeout_s=600)
        assert "engine loaded with fixed-batch engines for batch 12 onto cuda:0" in server.log()
        client = httpclient.InferenceServerClient(server.http_url)
        for rows in (12, 5, 16):  # its own bucket, then buckets of the symbolic engine
            got, want = served_and_eager_logits(client, "fixed", module, rows)
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_a_fixed_batch_engine_not_faster_is_measured_and_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(static_batches, "MIN_GAIN", 0.99)  # it would need to be 100x faster
    _, _, folder, index = _built(tmp_path)
    assert index["kept"] == {}
    facts = index["refused"]["12"]
    assert facts["reason"] == "not 99% faster"
    assert float(facts["symbolic_ms"]) > 0 and float(facts["static_ms"]) > 0
    assert not (folder / inductor_artifact.static_name(12)).exists()
