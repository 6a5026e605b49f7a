"""Warm-up inferences: run before a version reports ready, so no request pays for them.

Triton's ``model_warmup`` entries are honoured (zero_data, random_data, input_data_file from
the model's ``warmup/`` folder, count). Without entries every instance runs one inference
per batch size the batcher is likely to form (the preferred sizes, or the powers of two up
to max_batch_size and max_batch_size itself), with zeros, so that allocators, kernels and
ONNX Runtime's caches are initialised.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.config.model_config import to_engine_shapes
from enginehouse.errors import ModelLoadError
from enginehouse.repository.paths import WARMUP_FOLDER, contained
from enginehouse.runtime.instance import Execution, Instance

log = logging.getLogger(__name__)

# The largest warm-up tensor a config may ask for: a config can come from a client, and its
# dims alone must not make the server allocate gigabytes.
MAX_SAMPLE_BYTES = 2 << 30


@dataclass(frozen=True, slots=True)
class WarmupSample:
    """Inputs for one warm-up inference and how many times to run it."""

    name: str
    inputs: dict[str, np.ndarray]
    count: int


def _tensor(
    model: str,
    name: str,
    spec: mc.ModelWarmup.Input,
    batch: tuple[int, ...],
    model_dir: Path,
    rng: np.random.Generator,
) -> np.ndarray:
    dtype = datatypes.BY_CONFIG.get(spec.data_type)
    if dtype is None:
        raise ModelLoadError(f"model '{model}': warm-up input '{name}' has an unsupported type")
    shape = batch + tuple(spec.dims)
    if any(d < 0 for d in shape):
        raise ModelLoadError(f"model '{model}': warm-up input '{name}' needs fixed dims")
    size = math.prod(shape) * (dtype.itemsize or 8)  # BYTES: a reference per element
    if size > MAX_SAMPLE_BYTES:
        raise ModelLoadError(
            f"model '{model}': warm-up input '{name}' of shape {list(shape)} would take "
            f"{size} bytes; at most {MAX_SAMPLE_BYTES} are allowed"
        )
    kind = spec.WhichOneof("input_data_type")
    if kind == "input_data_file":
        path = contained(
            model_dir, f"{WARMUP_FOLDER}/{spec.input_data_file}", "input_data_file", model
        )
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"model '{model}': warm-up file: {exc}") from None
        single = datatypes.from_wire_bytes(raw, dtype, tuple(spec.dims), name)
        return np.broadcast_to(single, shape).copy() if batch else single
    if dtype.name == "BYTES":
        array = np.empty(shape, dtype=np.object_)
        array.fill(b"" if kind != "random_data" else b"warmup")
        return array
    if kind == "random_data":
        if dtype.numpy.kind == "f":
            return rng.standard_normal(shape).astype(dtype.numpy)
        if dtype.numpy.kind == "b":
            return rng.integers(0, 2, shape).astype(bool)
        return rng.integers(0, 8, shape).astype(dtype.numpy)
    return np.zeros(shape, dtype=dtype.numpy)


def default_batch_sizes(config: mc.ModelConfig) -> list[int]:
    """The batch sizes to warm when the config has no model_warmup entries."""
    if config.max_batch_size <= 0:
        return [0]
    preferred = [
        s for s in config.dynamic_batching.preferred_batch_size if 0 < s <= config.max_batch_size
    ]
    if preferred:
        return sorted({1, *preferred})
    sizes = {1, config.max_batch_size}
    size = 2
    while size < config.max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def samples(config: mc.ModelConfig, model_dir: Path, seed: int = 0) -> list[WarmupSample]:
    """The warm-up inferences of a model: its model_warmup entries, or the defaults."""
    rng = np.random.default_rng(seed)
    found: list[WarmupSample] = []
    for entry in config.model_warmup:
        batch = (entry.batch_size,) if config.max_batch_size > 0 else ()
        inputs = {
            name: _tensor(config.name, name, spec, batch, model_dir, rng)
            for name, spec in entry.inputs.items()
        }
        found.append(WarmupSample(entry.name or "warmup", inputs, max(1, entry.count)))
    if config.model_warmup:
        return found
    for size in default_batch_sizes(config):
        batch = (size,) if size else ()
        inputs = {}
        for tensor in config.input:
            spec = mc.ModelWarmup.Input(data_type=tensor.data_type, zero_data=True)
            spec.dims.extend(1 if d < 0 else d for d in tensor.dims)
            inputs[tensor.name] = _tensor(config.name, tensor.name, spec, batch, model_dir, rng)
        found.append(WarmupSample(f"default_batch_{size or 'nobatch'}", inputs, 1))
    return found


def _constant(inputs: dict[str, np.ndarray]) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: inputs


def _unchanged(outputs: list[np.ndarray]) -> list[np.ndarray]:
    return outputs


def warm(instance: Instance, config: mc.ModelConfig, warmups: list[WarmupSample]) -> float:
    """Run every warm-up sample on an instance; returns the seconds it took."""
    names = [t.name for t in config.output]
    started = time.perf_counter()
    prepared: list[dict[str, np.ndarray]] = []
    for sample in warmups:
        inputs = to_engine_shapes(config, sample.inputs)
        prepared.append(inputs)
        for _ in range(sample.count):
            _run(instance, config, sample.name, inputs, names)
    if prepared:
        # The first runs were cold; the best of three now says what the model costs when
        # warm (other models may be loading on the other cores meanwhile).
        best = min(
            _run(instance, config, warmups[0].name, prepared[0], names).infer_ns for _ in range(3)
        )
        instance.policy.seed(best, sum(a.nbytes for a in prepared[0].values()))
    return time.perf_counter() - started


def _run(
    instance: Instance,
    config: mc.ModelConfig,
    sample: str,
    inputs: dict[str, np.ndarray],
    names: list[str],
) -> Execution:
    try:
        execution = instance.execute_sync(
            _constant(inputs), names, _unchanged, sum(a.nbytes for a in inputs.values())
        )
    except Exception as exc:
        raise ModelLoadError(
            f"model '{config.name}': warm-up '{sample}' failed on instance {instance.name}: {exc}"
        ) from exc
    if config.max_batch_size > 0 and inputs:
        short = execution.short_output(names, next(iter(inputs.values())).shape[0])
        if short is not None:
            raise ModelLoadError(f"model '{config.name}': warm-up '{sample}': {short}")
    return execution
