"""Which batch sizes CUDA-graph engines capture, and how much a batch is padded."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends.graph_setup import default_buckets
from enginehouse.backends.torch import graph_buckets
from enginehouse.errors import ModelLoadError


def _padding(buckets: list[int], rows: int) -> float:
    bucket = min(b for b in buckets if b >= rows)
    return (bucket - rows) / bucket


@pytest.mark.parametrize("largest", [1, 6, 64, 100, 256, 1024])
def test_default_buckets_bound_the_padding(largest: int) -> None:
    buckets = default_buckets(largest)
    assert buckets == sorted(set(buckets))
    assert buckets[0] == 1 and buckets[-1] == largest
    for rows in range(16, largest + 1):
        assert _padding(buckets, rows) < 0.2, rows
    for rows in range(1, min(16, largest + 1)):
        assert _padding(buckets, rows) < 0.5, rows


def test_default_buckets_are_few() -> None:
    assert default_buckets(64) == [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert len(default_buckets(1024)) == 30  # four per doubling from 16


def test_preferred_sizes_are_buckets() -> None:
    assert 50 in default_buckets(100, [50, 500, 0])
    assert 500 not in default_buckets(100, [500])


def _config(text: str) -> mc.ModelConfig:
    return text_format.Parse(f'name: "m" max_batch_size: 64\n{text}', mc.ModelConfig())


def test_graph_buckets_from_config() -> None:
    assert graph_buckets(_config("")) == default_buckets(64)
    batching = "dynamic_batching { preferred_batch_size: [36] }"
    assert 36 in graph_buckets(_config(batching))
    chosen = 'parameters { key: "cuda_graph_batch_buckets" value: { string_value: "32, 1,8" } }'
    assert graph_buckets(_config(chosen)) == [1, 8, 32]


@pytest.mark.parametrize("text", ["0,8", "1,65", "1,x"])
def test_graph_buckets_refuse_bad_lists(text: str) -> None:
    chosen = f'parameters {{ key: "cuda_graph_batch_buckets" value: {{ string_value: "{text}" }} }}'
    with pytest.raises(ModelLoadError, match="cuda_graph_batch_buckets"):
        graph_buckets(_config(chosen))


def test_fixed_batch_engines_sizes_are_buckets() -> None:
    static = 'parameters { key: "engine_static_batch_sizes" value: { string_value: "36" } }'
    assert 36 in graph_buckets(_config(static))
    chosen = 'parameters { key: "cuda_graph_batch_buckets" value: { string_value: "1,8" } }'
    assert graph_buckets(_config(f"{static}\n{chosen}")) == [1, 8, 36]
